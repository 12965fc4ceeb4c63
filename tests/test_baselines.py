"""Tests for ssl4sci.baselines: timm baselines from local files and the (unreachable / cached) Hub, offline."""
from __future__ import annotations

import hashlib

import pytest
import timm
import torch

from ssl4sci.baselines import BaselineError, baseline_normalisation, load_timm_baseline

NAME = "vit_tiny_patch16_224.augreg_in21k"  # a real timm tag; nothing is ever downloaded here
HUB_REPO = "timm/vit_tiny_patch16_224.augreg_in21k"


@pytest.fixture()
def hub_offline(monkeypatch, tmp_path):
    """The Hub unreachable and an empty cache (huggingface_hub reads env vars at import: patch constants)."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path / "hf-cache"


def tiny_model(in_chans=3):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32,
                             in_chans=in_chans).eval()


@pytest.fixture(scope="module")
def full_tiny():
    return tiny_model()


def save(model, path):
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(model.state_dict(), str(path))
    else:
        torch.save(model.state_dict(), path)
    return path


def _safetensors_available() -> bool:
    try:
        import safetensors  # noqa: F401
    except ImportError:
        return False
    return True


SUFFIXES = [".pth"] + ([".safetensors"] if _safetensors_available() else [])


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_local_weights_give_identical_outputs(tmp_path, full_tiny, hub_offline, suffix):
    path = save(full_tiny, tmp_path / f"w{suffix}")
    model, prov = load_timm_baseline(NAME, str(path), in_chans=3, img_size=32)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), full_tiny(x))
    assert not model.training and model.num_features == 192
    assert prov["method"] == f"timm:{NAME}" and prov["model"] == NAME
    assert prov["checkpoint_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert prov["weights"] == f"file:{path}"
    assert prov["mean"] == "0.5,0.5,0.5" and prov["pretrained_input_size"] == "3x224x224"
    assert all(isinstance(v, str) for v in prov.values())  # parquet metadata is str -> str


def test_wrapped_checkpoint_and_timm_prefix(tmp_path, full_tiny, hub_offline):
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": full_tiny.state_dict(), "epoch": 3}, path)
    model, prov = load_timm_baseline(f"timm:{NAME}", str(path), in_chans=3, img_size=32)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), full_tiny(x))
    assert prov["method"] == f"timm:{NAME}"


def test_rgb_weights_adapted_to_one_channel(tmp_path, full_tiny, hub_offline):
    """timm sums the RGB stem for 1 channel: a grey image behaves like the same image in R, G and B."""
    path = save(full_tiny, tmp_path / "w.pth")
    model, prov = load_timm_baseline(NAME, str(path), in_chans=1, img_size=32)
    g = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(g), full_tiny(g.repeat(1, 3, 1, 1)), atol=1e-5, rtol=1e-5)
    assert baseline_normalisation(model) == ((0.5,), (0.5,)) and prov["mean"] == "0.5"


def test_position_embeddings_resampled_to_img_size(tmp_path, full_tiny, hub_offline):
    path = save(full_tiny, tmp_path / "w.pth")  # trained at 32 px (2x2 patches)
    model, _ = load_timm_baseline(NAME, str(path), in_chans=3, img_size=64)
    assert model.pos_embed.shape == (1, 1 + 16, 192)
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, 192)


def test_normalisation_from_pretrained_cfg(full_tiny):
    mean, std = baseline_normalisation(full_tiny)  # vit_tiny default tag: mean = std = 0.5
    assert mean == (0.5, 0.5, 0.5) and std == (0.5, 0.5, 0.5)
    resnet = timm.create_model("resnet18.a1_in1k", pretrained=False, num_classes=0, in_chans=4)
    mean, std = baseline_normalisation(resnet)  # ImageNet statistics, repeated cyclically to 4 channels
    assert mean == pytest.approx((0.485, 0.456, 0.406, 0.485)) and std == pytest.approx((0.229, 0.224, 0.225, 0.229))
    mean, std = baseline_normalisation(resnet, in_chans=1)
    assert mean == pytest.approx((sum((0.485, 0.456, 0.406)) / 3,))


def test_non_vit_architecture_without_img_size(tmp_path, hub_offline):
    torch.manual_seed(0)
    ref = timm.create_model("resnet18.a1_in1k", pretrained=False, num_classes=0).eval()
    path = save(ref, tmp_path / "r.pth")
    model, prov = load_timm_baseline("resnet18.a1_in1k", str(path), in_chans=3, img_size=32)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    assert prov["mean"] == "0.485,0.456,0.406"


def test_hub_unreachable_one_line_error(hub_offline):
    with pytest.raises(BaselineError) as exc:
        load_timm_baseline(NAME, None, in_chans=3, img_size=32)
    msg = str(exc.value)
    assert msg == (
        f"timm model {NAME}: no weights cached and the Hub is unreachable; "
        "set embed.timm_baselines[..].weights to a local file"
    )
    assert "\n" not in msg and isinstance(exc.value, ValueError)


def test_hub_weights_from_the_local_cache_offline(hub_offline, full_tiny):
    """A Hub model already in the Hugging Face cache loads offline; provenance hashes the cached file."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = hub_offline / f"models--{HUB_REPO.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    cached = save(full_tiny, snap / ("model.safetensors" if _safetensors_available() else "pytorch_model.bin"))
    model, prov = load_timm_baseline(NAME, None, in_chans=3, img_size=32)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), full_tiny(x))
    assert prov["checkpoint_sha256"] == hashlib.sha256(cached.read_bytes()).hexdigest()
    assert prov["weights"] == f"hf-hub:{HUB_REPO}/{cached.name}"


@pytest.mark.parametrize(
    "name,match",
    [
        ("vit_tinyy_patch16_224",
         r"timm model 'vit_tinyy_patch16_224': unknown to timm .*did you mean vit_tiny_patch16_224"),
        ("not_a_model_at_all", r"timm model 'not_a_model_at_all': unknown to timm"),
        ("vit_tiny_patch16_224.bogus", r"no such pretrained tag; available: vit_tiny_patch16_224\.augreg_in21k"),
    ],
)
def test_bad_name_one_line_error(name, match, hub_offline):
    with pytest.raises(BaselineError, match=match) as exc:
        load_timm_baseline(name, None, in_chans=3, img_size=32)
    assert "\n" not in str(exc.value)


def test_bad_weight_files(tmp_path, full_tiny, hub_offline):
    with pytest.raises(BaselineError, match=r"weights file .*missing\.pth not found"):
        load_timm_baseline(NAME, str(tmp_path / "missing.pth"), 3, 32)
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(BaselineError, match=r"suffix '\.txt'"):
        load_timm_baseline(NAME, str(tmp_path / "w.txt"), 3, 32)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(BaselineError, match=r"could not load weights file .*junk\.pth") as exc:
        load_timm_baseline(NAME, str(tmp_path / "junk.pth"), 3, 32)
    assert "\n" not in str(exc.value)
    # another architecture's weights: shape mismatch
    narrow = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, embed_dim=96,
                               depth=1)
    with pytest.raises(BaselineError, match=r"could not load weights file .*size mismatch"):
        load_timm_baseline(NAME, str(save(narrow, tmp_path / "narrow.pth")), 3, 32)
    # missing tensors are not silently left at random init
    sd = {k: v for k, v in full_tiny.state_dict().items() if not k.startswith("blocks.11.")}
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(BaselineError, match=r"do not match the architecture \(\d+ missing keys: blocks\.11\."):
        load_timm_baseline(NAME, str(tmp_path / "partial.pth"), 3, 32)
