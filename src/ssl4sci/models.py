"""Backbones: timm's create_model is the single door; checkpoints map back to backbones."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn


def create_backbone(model_cfg: dict[str, Any], in_chans: int, img_size: int, drop_path_rate: float | None = None) -> nn.Module:
    """A timm ViT returning the pooled (CLS) feature; ``dynamic_img_size`` so local crops of any size work."""
    kwargs: dict[str, Any] = dict(
        pretrained=False,
        num_classes=0,
        in_chans=in_chans,
        img_size=img_size,
        patch_size=model_cfg["patch_size"],
        dynamic_img_size=True,
        drop_path_rate=model_cfg["drop_path_rate"] if drop_path_rate is None else drop_path_rate,
    )
    if model_cfg.get("depth"):
        kwargs["depth"] = model_cfg["depth"]
    try:
        return timm.create_model(model_cfg["name"], **kwargs)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"config key 'model.name': timm could not build '{model_cfg['name']}' as a ViT ({exc})") from exc


def embed_dim(backbone: nn.Module) -> int:
    return int(getattr(backbone, "num_features", getattr(backbone, "embed_dim")))


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_backbone(method: str, checkpoint: str | Path | None, model_cfg: dict[str, Any], in_chans: int, img_size: int, seed: int = 0):
    """The backbone named by ``method``: a trained teacher from a checkpoint, or a baseline.

    Returns (backbone in eval mode, provenance dict for metadata).
    """
    if method == "random_init":
        torch.manual_seed(seed)
        backbone = create_backbone(model_cfg, in_chans, img_size, drop_path_rate=0.0)
        return backbone.eval(), {"method": method, "model": model_cfg["name"], "checkpoint_sha256": f"none (random init, seed {seed})"}
    if checkpoint is None:
        raise ValueError(f"method '{method}' needs a checkpoint")
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if "teacher_backbone" not in ckpt:
        raise ValueError(f"{checkpoint}: expected an ssl4sci pretrain checkpoint with 'teacher_backbone' weights")
    hp = ckpt["ssl4sci"]
    backbone = create_backbone(hp["model"], hp["in_chans"], hp["img_size"], drop_path_rate=0.0)
    backbone.load_state_dict(ckpt["teacher_backbone"])
    return backbone.eval(), {"method": method, "model": hp["model"]["name"], "checkpoint_sha256": file_sha256(checkpoint)}


def pick_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("config key 'device': 'cuda' requested but no GPU is visible")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
