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
