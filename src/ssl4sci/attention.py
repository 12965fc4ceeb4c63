"""Attention stage: CLS-token attention of the last block, per head, overlaid on test images.

timm's ViT uses fused attention and never materialises the weights, so the last block is switched
to the explicit path (``fused_attn = False``) and the softmaxed weights are read by a hook on its
``attn_drop`` (identity at eval time).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ssl4sci.data import PreparedData
from ssl4sci.io import save_figure, write_json
from ssl4sci.models import load_backbone, pick_device
from ssl4sci.runtime import setup_process


@torch.no_grad()
def cls_attention(backbone: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, heads, H, W) attention of the CLS token to the patch tokens in the last block, upsampled to pixels."""
    block = backbone.blocks[-1]
    captured: list[torch.Tensor] = []
    previous = block.attn.fused_attn
    block.attn.fused_attn = False
    handle = block.attn.attn_drop.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
    try:
        backbone(images)
    finally:
        handle.remove()
        block.attn.fused_attn = previous
    attn = captured[-1]  # (B, heads, tokens, tokens)
    n_prefix = getattr(backbone, "num_prefix_tokens", 1)
    cls_to_patches = attn[:, :, 0, n_prefix:]
    patch_embed = backbone.patch_embed
    if hasattr(patch_embed, "dynamic_feat_size"):
        grid_h, grid_w = patch_embed.dynamic_feat_size(images.shape[-2:])
    else:
        grid_h, grid_w = patch_embed.grid_size
    maps = cls_to_patches.reshape(attn.shape[0], attn.shape[1], grid_h, grid_w)
    # Nearest upsampling shows the patch grid honestly instead of inventing sub-patch detail.
    return F.interpolate(maps, size=images.shape[-2:], mode="nearest")


def attention_on_mask(maps: torch.Tensor, masks: np.ndarray) -> dict[str, float]:
    """Share of CLS attention (mean over heads) that falls on the mask, vs the mask's share of pixels."""
    mean_map = maps.mean(1)
    mean_map = mean_map / mean_map.sum(dim=(-2, -1), keepdim=True)
    m = torch.from_numpy(masks.astype(np.float32))
    on_arc = (mean_map * m).sum(dim=(-2, -1))
    uniform = m.mean(dim=(-2, -1))
    valid = uniform > 0
    if not valid.any():
        return {}
    arc, uni = on_arc[valid].mean().item(), uniform[valid].mean().item()
    return {"arc_attention_fraction": arc, "uniform_fraction": uni, "arc_attention_lift": arc / uni,
            "n_scored": int(valid.sum())}


def attention(data_dir: str | Path, out_dir: str | Path, method: str, checkpoint: str | Path | None,
              cfg: dict[str, Any], model_cfg: dict[str, Any], device: str = "auto",
              threads: int = 1) -> dict[str, Any]:
    out_dir = Path(out_dir)
    setup_process(threads, cfg["seed"])
    data = PreparedData(data_dir)
    backbone, provenance = load_backbone(method, checkpoint, model_cfg, data.channels, data.image_size,
                                         seed=cfg["seed"])
    dev = pick_device(device)
    backbone = backbone.to(dev).eval()
    test = data.rows(["test"])
    if len(test) == 0:
        raise ValueError(f"{data.dir / 'manifest.parquet'}: no test images to show attention on")
    rng = np.random.default_rng(cfg["seed"])

    def load(rows):
        raw = torch.stack([data.raw_image(int(s), int(i)) for s, i in zip(rows["shard"], rows["index"])])
        return raw, data.normalise(raw)

    # Gallery: a few test images of every class.
    picks = []
    for label in data.classes:
        rows = test[test["label"] == label]
        if len(rows):
            n_picked = min(cfg["images_per_class"], len(rows))
            picks.append(rows.iloc[np.sort(rng.choice(len(rows), size=n_picked, replace=False))])
    gallery_rows = pd.concat(picks)
    raw, norm = load(gallery_rows)
    maps = cls_attention(backbone, norm.to(dev)).cpu()
    plot_gallery(raw, maps, gallery_rows["label"].tolist(), out_dir / "gallery.png", method)

    # Score: does attention sit on the lensed arc? (only where the source kept truth masks)
    metrics: dict[str, float] = {}
    score_rows = test.iloc[np.sort(rng.choice(len(test), size=min(cfg["score_images"], len(test)), replace=False))]
    masks = [data.mask(int(s), int(i)) for s, i in zip(score_rows["shard"], score_rows["index"])]
    if all(m is not None for m in masks):
        batch_maps = []
        for start in range(0, len(score_rows), 64):
            _, norm = load(score_rows.iloc[start : start + 64])
            batch_maps.append(cls_attention(backbone, norm.to(dev)).cpu())
        metrics = attention_on_mask(torch.cat(batch_maps), np.stack(masks))
    maps_mean = maps.mean(1).flatten(1)
    p = maps_mean / maps_mean.sum(1, keepdim=True)
    metrics["mean_attention_entropy_bits"] = float(-(p * torch.log2(p.clamp_min(1e-12))).sum(1).mean())
    result = {"method": method, "metrics": metrics, "n_heads": int(maps.shape[1]), "backbone": provenance,
              "note": "arc_attention_fraction = share of last-block CLS attention (mean over heads) on pixels of "
                      "the noiseless arc mask; uniform_fraction = share expected from uniform attention"}
    write_json(out_dir / "scores.json", result)
    return result


def plot_gallery(raw: torch.Tensor, maps: torch.Tensor, labels: list[str], path: Path, method: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, heads = maps.shape[0], maps.shape[1]
    cols = 2 + heads
    fig, axes = plt.subplots(n, cols, figsize=(1.5 * cols, 1.5 * n + 0.4), squeeze=False, layout="constrained")
    for r in range(n):
        img = raw[r].mean(0).numpy()
        panels = [("image", None), ("mean", maps[r].mean(0))] + [(f"head {h}", maps[r, h]) for h in range(heads)]
        for c, (title, m) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(img, cmap="gray")
            if m is not None:
                ax.imshow(m.numpy(), cmap="inferno", alpha=0.55)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=8)
            if c == 0:
                ax.set_ylabel(labels[r], fontsize=8)
    fig.suptitle(f"{method}: last-block CLS attention per head (test images)", fontsize=9)
    save_figure(path, fig)
