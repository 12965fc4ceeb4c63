"""Pretrain -> embed -> finetune -> attention, run for real on the tiny prepared fixture."""
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from conftest import FINETUNE_CFG, MODEL_CFG, PRETRAIN_CFG

from ssl4sci.attention import attention, attention_on_mask, cls_attention
from ssl4sci.embed import embed
from ssl4sci.finetune import classification_metrics, finetune, regression_metrics
from ssl4sci.models import create_backbone, load_backbone
from ssl4sci.pretrain import pretrain


@pytest.fixture(scope="module")
def checkpoint(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    return pretrain(prepared, out, "dino", dict(PRETRAIN_CFG, epochs=2), MODEL_CFG, device="cpu", threads=2,
                    progress=False)


def test_pretrain_writes_checkpoint_metrics_and_plot(checkpoint):
    out = checkpoint.parent
    history = pd.read_csv(out / "metrics.csv")
    assert list(history["epoch"]) == [0, 1]
    assert np.isfinite(history["train_loss"]).all()
    assert history["step"].iloc[-1] == 2 * (18 // 8)  # 18 train images, batch 8, drop_last
    assert (out / "loss.png").stat().st_size > 1000
    assert not (out / "work").exists()
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert {"state_dict", "optimizer_states", "teacher_backbone", "ssl4sci", "history"} <= set(ckpt)


def test_embeddings_have_declared_width_provenance_and_every_image(prepared, checkpoint, tmp_path):
    out = embed(prepared, tmp_path / "dino.parquet", "dino", checkpoint, {"batch_size": 16, "seed": 0}, MODEL_CFG,
                device="cpu")
    table = pq.read_table(out)
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert meta["method"] == "dino" and len(meta["checkpoint_sha256"]) == 64
    dim = int(meta["embed_dim"])
    assert table.schema.field("embedding").type.list_size == dim == 192
    emb = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)
    assert emb.shape[0] == 36 and np.isfinite(emb).all()
    # the teacher backbone, not a fresh one: embeddings differ from random init of the same seed
    rand = embed(prepared, tmp_path / "r.parquet", "random_init", None, {"batch_size": 16, "seed": 0}, MODEL_CFG,
                 device="cpu")
    remb = pq.read_table(rand).column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)
    assert not np.allclose(emb, remb)
    assert set(table.column("split").to_pylist()) == {"train", "val", "test"}


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


@pytest.mark.parametrize("task", ["classify", "regress"])
def test_finetune_tasks(prepared, checkpoint, tmp_path, task):
    res = finetune(prepared, tmp_path, "dino", checkpoint, task, FINETUNE_CFG, MODEL_CFG, device="cpu", threads=2,
                   progress=False, domain="lensing")
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["task"] == task and saved["metrics"] == json.loads(json.dumps(res["metrics"]))
    if task == "classify":
        assert 0 <= res["metrics"]["accuracy"] <= 1 and 0 <= res["metrics"]["macro_auc"] <= 1
        assert set(res["metrics"]["auc_per_class"]) == {"no_sub", "cdm", "axion"}
        assert (tmp_path / "roc.png").exists()
    else:
        assert res["n_test"] == 3 and res["metrics"]["mae"] >= 0 and (tmp_path / "scatter.png").exists()


def test_metric_helpers_on_known_cases():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    m, _ = classification_metrics(probs, np.array([0, 1, 0, 1]), ["a", "b"])
    assert m["accuracy"] == 1.0 and m["macro_auc"] == 1.0
    r = regression_metrics(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 5.0]), baseline=2.0)
    assert r["mae"] == pytest.approx(2 / 3) and r["mae_predict_train_mean"] == pytest.approx(4 / 3)


def test_unknown_checkpoint_is_rejected(tmp_path):
    bad = tmp_path / "x.ckpt"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(ValueError, match="x.ckpt"):
        load_backbone("dino", bad, MODEL_CFG, 1, 32)


def test_killed_pretraining_resumes_from_its_last_epoch(prepared, tmp_path):
    """SIGKILL mid-run, then run again: finished epochs are restored from the work checkpoint, not redone."""
    import os
    import signal
    import subprocess
    import sys
    import time

    cfg = dict(PRETRAIN_CFG, epochs=40)
    cmd = [sys.executable, "-m", "ssl4sci.cli", "pretrain", "--cfg", json.dumps(cfg), "--model", json.dumps(MODEL_CFG),
           "--data", str(prepared), "--method", "dino", "--out", str(tmp_path), "--device", "cpu", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    work = None
    while time.time() < deadline and proc.poll() is None:
        found = list((tmp_path / "work").glob("*/last.ckpt"))
        if found and torch.load(found[0], map_location="cpu", weights_only=False)["epoch"] >= 2:
            work = found[0]
            break
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert work is not None, "no work checkpoint appeared"
    saved = torch.load(work, map_location="cpu", weights_only=False)["history"]
    assert not (tmp_path / "last.ckpt").exists()

    pretrain(prepared, tmp_path, "dino", cfg, MODEL_CFG, device="cpu", threads=2, progress=False)
    history = pd.read_csv(tmp_path / "metrics.csv")
    assert list(history["epoch"]) == list(range(40))
    # Wall-clock stamps of the killed process survive: those epochs were restored, not recomputed.
    assert list(history["time_s"][: len(saved)]) == pytest.approx([row["time_s"] for row in saved], rel=0, abs=1e-9)
    assert history["step"].iloc[-1] == 40 * (18 // 8)


def test_embed_with_a_public_timm_model_from_a_local_weight_file(prepared, tmp_path):
    """A timm baseline: weights from a local file, images normalised with the model's own statistics."""
    import timm

    from ssl4sci.baselines import baseline_normalisation
    from ssl4sci.data import PreparedData

    torch.manual_seed(1)
    public = timm.create_model("vit_tiny_patch16_224", num_classes=0, in_chans=1, img_size=32).eval()
    weights = tmp_path / "public.pth"
    torch.save(public.state_dict(), weights)
    out = embed(prepared, tmp_path / "timm.parquet", "timm_vit_tiny", None, {"batch_size": 16, "seed": 0}, MODEL_CFG,
                device="cpu", timm={"name": "vit_tiny_patch16_224", "weights": str(weights)})
    table = pq.read_table(out)
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert meta["method"] == "timm_vit_tiny" and meta["checkpoint_sha256"] != ""
    emb = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(len(table), -1)
    data = PreparedData(prepared)
    mean, std = (torch.tensor(v).view(-1, 1, 1) for v in baseline_normalisation(public, 1))
    row = data.rows().iloc[0]
    with torch.no_grad():
        expected = public(((data.raw_image(int(row["shard"]), int(row["index"])) - mean) / std)[None])[0].numpy()
    np.testing.assert_allclose(emb[0], expected, rtol=1e-4, atol=1e-5)


def test_finetune_augments_photos_with_horizontal_flips_only_and_lensing_with_the_dihedral_group():
    """A 90° rotation is a symmetry of the sky, not of a butterfly photo: the domain picks the augmentation."""
    from ssl4sci.supervised import label_preserving_augment

    torch.manual_seed(0)
    img = torch.arange(16.0).reshape(1, 4, 4)
    allowed_photo = {img.flip(-1).numpy().tobytes(), img.numpy().tobytes()}
    photo = {label_preserving_augment("photo")(img).numpy().tobytes() for _ in range(200)}
    assert photo == allowed_photo
    lensing = {label_preserving_augment("lensing")(img).numpy().tobytes() for _ in range(400)}
    assert len(lensing) == 8  # every element of the dihedral group of the square
