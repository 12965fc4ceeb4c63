"""The pretrain stage (ssl4sci.pretrain), run for real on the tiny prepared fixture: its outputs, the effective rank
per monitored epoch, the collapse and non-finite-loss stops, and resuming a killed run."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import GUARD_CFG, MODEL_CFG, PRETRAIN_CFG

from ssl4sci.pretrain import pretrain
from ssl4sci.ssl.guard import NonFiniteLoss, TrainingCollapsed


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


def test_pretraining_records_the_effective_rank_per_monitored_epoch(prepared, tmp_path):
    """A tiny real run: the untrained network's rank before training, the rank and PC1 share on monitored epochs
    (NaN on the others) in metrics.csv and the checkpoint; the loss plot has its rank panel."""
    _run_pretrain(prepared, tmp_path, epochs=2)
    history = pd.read_csv(tmp_path / "metrics.csv")
    assert {"effective_rank", "pc1_share", "effective_rank_init"} <= set(history.columns)
    assert history["effective_rank"].isna().tolist() == [True, False]  # monitor.every_epochs = 2
    last = history.iloc[-1]
    from ssl4sci.data import PreparedData

    n_train = len(PreparedData(prepared).rows(["train"]))  # n centred images span at most n - 1 directions
    assert 1.0 < last["effective_rank"] <= n_train - 1 and 0.0 < last["pc1_share"] < 1.0
    initial = history["effective_rank_init"]
    assert initial.nunique() == 1 and 1.0 < initial.iloc[0] <= n_train - 1
    assert torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)["initial_rank"] == initial.iloc[0]
    assert (tmp_path / "loss.png").stat().st_size > 0


def _run_pretrain(prepared, out, **overrides):
    from ssl4sci.pretrain import pretrain

    return pretrain(prepared, out, "dino", dict(PRETRAIN_CFG, **overrides), MODEL_CFG, device="cpu", threads=2,
                    progress=False)


def test_collapsed_training_stops_with_one_line_and_keeps_the_last_checkpoint(prepared, tmp_path):
    """A teacher temperature of 50 makes every target uniform: the guard stops the run after its patience."""
    guard = {**GUARD_CFG, "enabled": True, "patience_epochs": 2, "start_epoch": 0, "loss_tolerance": 0.005,
             "min_teacher_kl": 1e-3}
    with pytest.raises(TrainingCollapsed) as err:
        _run_pretrain(prepared, tmp_path, epochs=6, teacher_temp=50.0, warmup_teacher_temp=50.0, guard=guard)
    message = str(err.value)
    assert "\n" not in message and "collapsed at epoch 1" in message and "same teacher distribution" in message
    kept = list((tmp_path / "work").glob("*/last.ckpt"))
    assert len(kept) == 1 and str(kept[0]) in message
    assert torch.load(kept[0], map_location="cpu", weights_only=False)["epoch"] == 0  # the epoch before the stop
    assert not (tmp_path / "last.ckpt").exists() and not (tmp_path / "metrics.csv").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(prepared, tmp_path):
    """An absurd learning rate, reached in the second step of a 3-epoch warm-up, blows the weights up; the next
    forward pass is non-finite and training stops, keeping epoch 0's checkpoint."""
    with pytest.raises(NonFiniteLoss) as err:
        _run_pretrain(prepared, tmp_path, epochs=4, warmup_epochs=3, base_lr=1e32, clip_grad=0.0, weight_decay=0.0,
                      weight_decay_end=0.0)
    message = str(err.value)
    assert "loss is nan" in message.lower() or "loss is inf" in message.lower()
    kept = list((tmp_path / "work").glob("*/last.ckpt"))
    assert len(kept) == 1 and str(kept[0]) in message
    state = torch.load(kept[0], map_location="cpu", weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["teacher_backbone"].values())


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


def _augment(**settings) -> dict:
    return {**PRETRAIN_CFG["augment"], **settings}


def test_views_cut_on_the_device_from_resident_images_equal_those_from_copied_batches(prepared, tmp_path):
    """augment.on_device cuts the views after the batch's copy; data_on_device keeps every image there and gathers
    the batches from it. Same seed, same shuffle, same draws: the two runs are identical, step for step. The loader
    path (views cut by the collate function) trains on the same recipe."""
    runs = {}
    for name, overrides in {"copied": {"augment": _augment(on_device=True)},
                            "resident": {"augment": _augment(on_device=True), "data_on_device": True},
                            "loader": {"augment": _augment(on_device=False)}}.items():
        _run_pretrain(prepared, tmp_path / name, epochs=2, **overrides)
        runs[name] = pd.read_csv(tmp_path / name / "metrics.csv")
    columns = ["step", "train_loss", "teacher_entropy", "teacher_kl", "crop_reject_rate"]
    pd.testing.assert_frame_equal(runs["copied"][columns], runs["resident"][columns])
    loader = runs["loader"]
    assert list(loader["step"]) == list(runs["copied"]["step"]) and np.isfinite(loader[columns].to_numpy()).all()
    assert 0 <= loader["crop_reject_rate"].min() and loader["crop_reject_rate"].max() < 1


def test_images_kept_on_the_device_need_the_views_cut_there(prepared, tmp_path):
    with pytest.raises(ValueError, match=r"pretrain\.data_on_device.*augment\.on_device"):
        _run_pretrain(prepared, tmp_path, epochs=1, data_on_device=True, augment=_augment(on_device=False))


@pytest.mark.parametrize("backend", ["eager", "no_such_backend"])
def test_compiled_training_and_the_eager_fallback(prepared, tmp_path, capsys, backend):
    """pretrain.compile traces the student and teacher (backend 'eager': dynamo's graph capture without a code
    generator, fast on a CPU); a backend that does not exist leaves them eager with one warning line. Either way
    the run finishes and the checkpoint's keys are those of an uncompiled run."""
    ckpt = _run_pretrain(prepared, tmp_path, epochs=1, compile=backend)
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "torch.compile" in line]
    if backend == "eager":
        assert warnings == []
    else:
        assert len(warnings) == 2 and "running eagerly" in warnings[0] and "no_such_backend" in warnings[0]
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert not any("_orig_mod" in key for key in state["state_dict"])
    assert np.isfinite(pd.read_csv(tmp_path / "metrics.csv")["train_loss"]).all()


@pytest.mark.parametrize("sync_every_steps", [1, 50])
def test_a_non_finite_loss_is_reported_at_its_step_however_rarely_the_host_reads(prepared, tmp_path,
                                                                                  sync_every_steps):
    """The loss's finiteness is recorded on the device each step and read every sync_every_steps steps and before
    every checkpoint: read each step or once per epoch, the stop names the same first non-finite step and keeps
    the same last good checkpoint."""
    with pytest.raises(NonFiniteLoss, match=r"loss is (nan|inf|-inf) at step 2 \(epoch 1\)") as err:
        _run_pretrain(prepared, tmp_path, epochs=4, warmup_epochs=3, base_lr=1e32, clip_grad=0.0, weight_decay=0.0,
                      weight_decay_end=0.0, sync_every_steps=sync_every_steps)
    kept = list((tmp_path / "work").glob("*/last.ckpt"))
    assert len(kept) == 1 and str(kept[0]) in str(err.value)
    assert torch.load(kept[0], map_location="cpu", weights_only=False)["epoch"] == 0


def test_device_views_scale_stored_uint8_pixels_like_the_dataset(prepared):
    """Photos are stored as uint8 and cross to the device as such; DeviceViews scales them to [0, 1] there, as
    PreparedData.raw_image does on the CPU: the same views as from the float pixels, copied or resident."""
    from ssl4sci.data import PreparedData
    from ssl4sci.pretrain import DeviceViews, make_multicrop

    cfg = dict(PRETRAIN_CFG, augment=_augment(domain="photo", zoom=True, keep_centre=False, min_signal_fraction=0.0))
    multicrop = make_multicrop(PreparedData(prepared), cfg)
    stored = torch.randint(0, 256, (4, 1, 40, 40), dtype=torch.uint8)
    torch.manual_seed(5)
    want = multicrop(stored.float() / 255.0)
    for views in (DeviceViews(multicrop, None), DeviceViews(multicrop, stored)):
        torch.manual_seed(5)
        got, labels = views(stored if views.resident is None else torch.arange(4))
        assert labels is None
        assert all(torch.equal(a, b) for a, b in zip(got["views"], want["views"]))


def test_batches_cut_on_the_device_follow_each_epochs_distributed_shuffle(prepared):
    """Batches of stored images for the device (and row positions for resident images) come from the rank's share of
    the DistributedSampler's permutation, and the epoch Lightning sets reaches it: each epoch its own order."""
    import numpy as np

    from ssl4sci.data import PreparedData
    from ssl4sci.pretrain import multicrop_loader, pretrain_rows

    data = PreparedData(prepared)
    rows = pretrain_rows(data, PRETRAIN_CFG)
    cfg = dict(PRETRAIN_CFG, augment=_augment(on_device=True))
    loader = multicrop_loader(data, rows, cfg, 4, world_size=2, rank=1, on_device=True, resident=True)

    def epoch(e: int) -> list[int]:
        loader.sampler.set_epoch(e)  # what Lightning calls on the loader's sampler
        return [int(i) for batch in loader for i in batch]

    first, second = epoch(0), epoch(1)
    assert len(first) == len(second) == (len(rows) // 2 // 4) * 4 and first != second
    share = torch.utils.data.DistributedSampler(range(len(rows)), num_replicas=2, rank=1, shuffle=True,
                                                seed=cfg["seed"], drop_last=True)
    share.set_epoch(1)
    assert second == list(share)[:len(second)]
    stored = multicrop_loader(data, rows, cfg, 4, world_size=2, rank=1, on_device=True)
    stored.sampler.set_epoch(1)
    images = torch.cat(list(stored))
    want = data.stored_images(rows["shard"].to_numpy()[second], rows["index"].to_numpy()[second])
    assert np.array_equal(images.numpy(), want)
