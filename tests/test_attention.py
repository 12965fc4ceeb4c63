"""The attention stage (ssl4sci.attention): CLS attention maps, the share on the arcs, the gallery."""
import json

import numpy as np
import pytest
import torch
from conftest import MODEL_CFG

from ssl4sci.attention import attention, attention_on_mask, cls_attention
from ssl4sci.models import create_backbone


def test_attention_hook_equals_explicit_softmax(prepared):
    torch.manual_seed(0)
    vit = create_backbone(MODEL_CFG, 1, 32, drop_path_rate=0.0).eval()
    x = torch.randn(2, 1, 32, 32)
    maps = cls_attention(vit, x)
    assert maps.shape == (2, 3, 32, 32)
    # Recompute the last block's attention by hand from its qkv projection.
    feats = {}
    vit.blocks[-1].norm1.register_forward_hook(lambda m, i, o: feats.setdefault("x", o))
    with torch.no_grad():
        vit(x)
        attn_mod = vit.blocks[-1].attn
        b, n, c = feats["x"].shape
        heads = attn_mod.num_heads
        qkv = attn_mod.qkv(feats["x"]).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k = attn_mod.q_norm(qkv[0]), attn_mod.k_norm(qkv[1])
        attn = ((q * attn_mod.scale) @ k.transpose(-2, -1)).softmax(-1)
    expected = attn[:, :, 0, 1:].reshape(2, 3, 4, 4)
    assert torch.allclose(maps[:, :, ::8, ::8], expected, atol=1e-6)


def test_attention_on_mask_score():
    maps = torch.zeros(1, 2, 4, 4)
    maps[0, :, 0, 0] = 1.0  # all attention on one pixel
    mask = np.zeros((1, 4, 4), bool)
    mask[0, 0, :2] = True
    s = attention_on_mask(maps, mask)
    assert s["arc_attention_fraction"] == pytest.approx(1.0) and s["uniform_fraction"] == pytest.approx(2 / 16)


def test_attention_stage_writes_gallery_and_scores(prepared, checkpoint, tmp_path):
    res = attention(prepared, tmp_path, "dino", checkpoint, {"images_per_class": 2, "score_images": 9, "seed": 0},
                    MODEL_CFG, device="cpu")
    assert (tmp_path / "gallery.png").stat().st_size > 1000
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores == json.loads(json.dumps(res))
    assert 0 < scores["metrics"]["arc_attention_fraction"] <= 1 and scores["metrics"]["n_scored"] == 9
