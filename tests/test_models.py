"""Backbones built through timm: ViT as before, tiny Swin at small and mixed crop sizes, tokens, checkpoints."""
from __future__ import annotations

import pytest
import timm
import torch
from conftest import MODEL_CFG, REPO

from ssl4sci.models import backbone_tokens, create_backbone, embed_dim, load_backbone

VIT_CFG = {"name": "vit_tiny_patch16_224", "patch_size": 8, "depth": 1, "drop_path_rate": 0.0}
# 64 px, 4 px patches: a 16x16 grid, then 8x8 after the one patch merging; 4x4 windows fit both stages exactly.
SWIN_CFG = {"name": "swin_tiny_patch4_window7_224", "patch_size": 4, "depth": 4, "drop_path_rate": 0.0,
            "window_size": 4, "embed_dim": 24, "depths": [2, 2], "num_heads": [2, 4]}
# patch_size and depth are ViT keys, present in every model section: a CNN ignores them.
CNN_CFG = {"name": "resnet18", "patch_size": 8, "depth": 6, "drop_path_rate": 0.0}


# One thread: these tests are tiny, and two threads on a shared 2-core machine made one of them 50x slower.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def swin():
    torch.manual_seed(0)
    return create_backbone(SWIN_CFG, in_chans=1, img_size=64).eval()


def test_vit_is_built_exactly_as_before():
    torch.manual_seed(0)
    ours = create_backbone(VIT_CFG, in_chans=1, img_size=32).eval()
    torch.manual_seed(0)
    direct = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, in_chans=1, img_size=32,
                               patch_size=8, dynamic_img_size=True, drop_path_rate=0.0, depth=1).eval()
    assert ours.state_dict().keys() == direct.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), direct.state_dict().values()))
    x = torch.randn(2, 1, 16, 16)  # a local crop: dynamic_img_size still on
    with torch.no_grad():
        assert torch.equal(ours(x), direct(x))
    assert embed_dim(ours) == 192


def test_swin_takes_the_configured_sizes(swin):
    assert type(swin).__name__ == "SwinTransformer"
    assert swin.embed_dim == 24 and [len(stage.blocks) for stage in swin.layers] == [2, 2]
    assert [stage.blocks[0].attn.num_heads for stage in swin.layers] == [2, 4]
    assert all(block.window_size == (4, 4) for stage in swin.layers for block in stage.blocks)
    assert swin.layers[0].blocks[1].shift_size == (2, 2)  # every second block shifts its windows
    assert embed_dim(swin) == 48  # 24 doubled by the one patch merging


@pytest.mark.parametrize("size", [64, 48, 32])
def test_swin_accepts_global_and_local_crop_sizes(swin, size):
    with torch.no_grad():
        out = swin(torch.randn(2, 1, size, size))
    assert out.shape == (2, embed_dim(swin)) and torch.isfinite(out).all()


@pytest.mark.parametrize("in_chans", [1, 3, 5])
def test_swin_and_vit_take_any_channel_count(in_chans):
    for cfg, size in ((SWIN_CFG, 32), (VIT_CFG, 16)):
        backbone = create_backbone(cfg, in_chans=in_chans, img_size=size).eval()
        with torch.no_grad():
            assert backbone(torch.randn(1, in_chans, size, size)).shape == (1, embed_dim(backbone))


def test_swin_num_heads_may_be_one_int():
    cfg = {**SWIN_CFG, "num_heads": 3, "embed_dim": 12}
    backbone = create_backbone(cfg, in_chans=1, img_size=32)
    assert [stage.blocks[0].attn.num_heads for stage in backbone.layers] == [3, 3]


def test_unsupported_models_name_the_config_key():
    with pytest.raises(ValueError, match=r"'model\.name'.*mixer_s16_224"):  # an MLP-Mixer gives tokens, not a map
        create_backbone({"name": "mixer_s16_224", "patch_size": 4, "drop_path_rate": 0.0}, 1, 32)
    with pytest.raises(ValueError, match=r"'model\.window_size'.*CNN"):
        create_backbone({**CNN_CFG, "window_size": 4}, 1, 32)
    with pytest.raises(ValueError, match=r"'model\.name'"):
        create_backbone({"name": "no_such_model_at_all", "patch_size": 4, "drop_path_rate": 0.0}, 1, 32)
    with pytest.raises(ValueError, match=r"'model\.window_size'"):
        create_backbone({**VIT_CFG, "window_size": 4}, 1, 32)
    with pytest.raises(ValueError, match=r"'model\.num_heads'"):
        create_backbone({**SWIN_CFG, "num_heads": [2, 4, 8]}, 1, 32)


@pytest.mark.parametrize("family", ["vit", "swin", "cnn"])
def test_backbone_tokens_pool_like_forward_and_count_patches(swin, family):
    if family == "cnn":
        torch.manual_seed(0)
        backbone = create_backbone(CNN_CFG, in_chans=1, img_size=64).eval()
        sizes = {64: 4, 32: 1}  # ResNet reduces by 32: a 2x2 map at 64 px, 1x1 at 32 px
    elif family == "vit":
        torch.manual_seed(0)
        backbone = create_backbone(VIT_CFG, in_chans=1, img_size=32).eval()
        sizes = {32: 16, 16: 4}  # (32/8)^2, (16/8)^2
    else:
        backbone = swin
        sizes = {64: 64, 32: 16}  # 64 px: 16x16 patches merged to 8x8; 32 px: 4x4
    for size, n_tokens in sizes.items():
        x = torch.randn(3, 1, size, size)
        with torch.no_grad():
            pooled, tokens = backbone_tokens(backbone, x)
            assert torch.allclose(pooled, backbone(x), atol=1e-6)
        assert tokens.shape == (3, n_tokens, embed_dim(backbone))
        if family in ("swin", "cnn"):  # average pooling: the pooled feature is the mean of the final tokens
            assert torch.allclose(tokens.mean(1), pooled, atol=1e-5)


def test_backbone_tokens_drop_register_tokens_too():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, in_chans=1, img_size=32,
                            patch_size=8, depth=1, reg_tokens=2, dynamic_img_size=True).eval()
    assert vit.num_prefix_tokens == 3
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        pooled, tokens = backbone_tokens(vit, x)
        full = vit.forward_features(x)
    assert tokens.shape == (2, 16, 192) and torch.equal(tokens, full[:, 3:])
    assert torch.allclose(pooled, full[:, 0], atol=1e-6)  # the CLS token


def test_load_backbone_round_trips_a_swin_checkpoint(swin, tmp_path):
    ckpt = tmp_path / "esvit.ckpt"
    torch.save({"teacher_backbone": swin.state_dict(),
                "ssl4sci": {"method": "esvit", "model": SWIN_CFG, "in_chans": 1, "img_size": 64}}, ckpt)
    loaded, provenance = load_backbone("esvit", ckpt, VIT_CFG, 1, 64)  # the checkpoint's model wins
    assert not loaded.training and provenance["model"] == SWIN_CFG["name"]
    assert len(provenance["checkpoint_sha256"]) == 64
    for size in (64, 32):
        x = torch.randn(2, 1, size, size)
        with torch.no_grad():
            assert torch.equal(loaded(x), swin(x))


@pytest.mark.parametrize("config_name", ["config.yaml", "lensing_model1.yaml"])
def test_shipped_esvit_backbones_take_their_global_and_local_crops(config_name):
    """The Swin each shipped config trains (default: small Swin at 64 px; full size: Swin-T at 144 px, window 6)."""
    from ssl4sci.config import load_config, model_for
    from ssl4sci.models import backbone_family

    cfg = load_config(REPO / "config" / config_name)
    pre = cfg["pretrain"]
    backbone = create_backbone(model_for(cfg, "esvit"), 1, cfg["prepare"]["image_size"], drop_path_rate=0.0).eval()
    assert backbone_family(backbone) == "swin"
    with torch.no_grad():
        for size in (pre["global_crop_size"], pre["local_crop_size"]):
            pooled, tokens = backbone_tokens(backbone, torch.randn(1, 1, size, size))
            assert pooled.shape == (1, embed_dim(backbone)) and tokens.shape[1] >= 1 and torch.isfinite(tokens).all()


def test_cnn_is_built_exactly_as_timm_builds_it():
    from ssl4sci.models import backbone_family

    torch.manual_seed(0)
    ours = create_backbone(CNN_CFG, in_chans=1, img_size=64).eval()
    torch.manual_seed(0)
    direct = timm.create_model("resnet18", pretrained=False, num_classes=0, in_chans=1).eval()
    assert backbone_family(ours) == "cnn" and embed_dim(ours) == 512
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), direct.state_dict().values()))
    x = torch.randn(2, 1, 48, 48)  # any crop size: no patch grid
    with torch.no_grad():
        assert torch.equal(ours(x), direct(x))


@pytest.mark.parametrize("in_chans", [1, 3, 5])
def test_cnn_takes_any_channel_count_and_crop_size(in_chans):
    backbone = create_backbone({**CNN_CFG, "name": "convnext_atto"}, in_chans=in_chans, img_size=64).eval()
    with torch.no_grad():
        for size in (64, 32):  # ConvNeXt downsamples 32x: 32 px is its smallest input
            out = backbone(torch.randn(2, in_chans, size, size))
            assert out.shape == (2, embed_dim(backbone)) and torch.isfinite(out).all()


def test_load_backbone_round_trips_a_cnn_checkpoint(tmp_path):
    torch.manual_seed(1)
    cnn = create_backbone(CNN_CFG, in_chans=1, img_size=64).eval()
    ckpt = tmp_path / "dino.ckpt"
    torch.save({"teacher_backbone": cnn.state_dict(),
                "ssl4sci": {"method": "dino", "model": CNN_CFG, "in_chans": 1, "img_size": 64}}, ckpt)
    loaded, provenance = load_backbone("dino", ckpt, VIT_CFG, 1, 64)
    assert provenance["model"] == "resnet18"
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), cnn(x))


def test_unknown_checkpoint_is_rejected(tmp_path):
    bad = tmp_path / "x.ckpt"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(ValueError, match="x.ckpt"):
        load_backbone("dino", bad, MODEL_CFG, 1, 32)


@pytest.mark.parametrize("cfg", [VIT_CFG, SWIN_CFG, CNN_CFG], ids=["vit", "swin", "cnn"])
def test_grad_checkpointing_keeps_the_gradients_and_saves_less(cfg):
    """model.grad_checkpointing: the same output and parameter gradients, and autograd keeps a fraction of the
    activations for backward (the blocks recompute theirs)."""
    from conftest import saved_bytes

    def step(checkpointing: bool):
        torch.manual_seed(0)
        backbone = create_backbone({**cfg, "depth": 2, "grad_checkpointing": checkpointing}, 1, 64).double().train()
        x = torch.randn(4, 1, 64, 64, dtype=torch.float64)
        out, saved = saved_bytes(lambda: backbone(x), existing=tuple(backbone.parameters()))
        out.square().sum().backward()
        return out, [p.grad for p in backbone.parameters()], saved

    plain, grads, plain_saved = step(False)
    recomputed, recomputed_grads, recomputed_saved = step(True)
    assert torch.allclose(plain, recomputed, atol=1e-10)
    assert all(torch.allclose(a, b, atol=1e-8) for a, b in zip(grads, recomputed_grads))
    assert recomputed_saved < 0.6 * plain_saved


def test_grad_checkpointing_a_cnn_without_it_names_the_key():
    with pytest.raises(ValueError, match=r"^config key 'model\.grad_checkpointing': timm's 'dla34' cannot"):
        create_backbone({**CNN_CFG, "name": "dla34", "grad_checkpointing": True}, 1, 64)
