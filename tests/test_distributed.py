"""Multi-process (DDP over gloo) pretraining and preemption by SIGTERM/SIGUSR1, run for real on the tiny fixture.

The CLI runs in a subprocess, as Snakemake and srun start it: Lightning launches the second DDP process by
running the same command again, and the signals go to a real process. Preemption ends the process with
128 + the signal number (143 for SIGTERM, 138 for SIGUSR1) and one line on stderr.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import MODEL_CFG, PRETRAIN_CFG

from ssl4sci.models import load_backbone
from ssl4sci.pretrain import pretrain

N_TRAIN = 18  # train images in the `prepared` fixture
MESSAGE = re.compile(r"^ssl4sci pretrain: pretraining interrupted by (SIG\w+) at step (\d+); "
                     r"checkpoint saved to (\S+); re-run to resume$", re.M)


def cli(prepared: Path, out: Path, cfg: dict) -> list[str]:
    return [sys.executable, "-m", "ssl4sci.cli", "pretrain", "--cfg", json.dumps(cfg), "--model", json.dumps(MODEL_CFG),
            "--data", str(prepared), "--method", "dino", "--out", str(out), "--device", "cpu", "--threads", "2",
            "--no-progress"]


def work_checkpoint(out: Path) -> Path | None:
    found = list((out / "work").glob("*/last.ckpt"))
    return found[0] if found else None


def run_and_signal(cmd: list[str], out: Path, sig: int, new_epochs: int = 2) -> tuple[int, str]:
    """Start ``cmd``; as soon as it has written ``new_epochs`` epoch checkpoints, send ``sig`` to it (the first
    process only; under DDP the others learn it from rank 0). Returns its exit status and stderr."""

    def state():
        path = work_checkpoint(out)
        try:
            st = path.stat() if path else None
        except FileNotFoundError:  # between the rename of one checkpoint and the next
            return None
        return (st.st_ino, st.st_mtime_ns) if st else None

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        seen, changes, deadline = state(), 0, time.time() + 120
        while changes < new_epochs and time.time() < deadline and proc.poll() is None:
            now = state()
            if now is not None and now != seen:
                seen, changes = now, changes + 1
            time.sleep(0.005)
        assert proc.poll() is None, f"pretraining ended (status {proc.returncode}) before it could be signalled"
        assert changes == new_epochs, "no epoch checkpoint appeared in time"
        os.kill(proc.pid, sig)  # right after an epoch boundary: the signal arrives early in the next epoch
        _, err = proc.communicate(timeout=120)
        return proc.returncode, err
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # only on failure: this test's process group
            proc.wait()


def check_message(err: str, sig: int, work: Path) -> int:
    lines = MESSAGE.findall(err)
    assert len(lines) == 1, err  # one line, from rank 0 only
    name, step, path = lines[0]
    assert name == signal.Signals(sig).name and Path(path) == work
    return int(step)


def check_outputs(out: Path, epochs: int, steps_per_epoch: int) -> pd.DataFrame:
    assert sorted(p.name for p in out.iterdir()) == ["last.ckpt", "loss.png", "metrics.csv"]  # no work dir, no strays
    history = pd.read_csv(out / "metrics.csv")
    assert list(history["epoch"]) == list(range(epochs))
    assert list(history["step"]) == [steps_per_epoch * (e + 1) for e in range(epochs)]
    assert np.isfinite(history["train_loss"]).all()
    # the untrained network's effective rank, measured before the first step, survives the resume (checkpoint)
    assert history["effective_rank_init"].notna().all() and history["effective_rank_init"].nunique() == 1
    ckpt = torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == epochs * steps_per_epoch
    # AdamW counts its own steps: restored on resume, so it equals the total only if no step was redone or lost
    assert ckpt["optimizer_states"][0]["state"][0]["step"] == epochs * steps_per_epoch
    backbone, _ = load_backbone("dino", out / "last.ckpt", MODEL_CFG, 1, 32)
    with torch.no_grad():
        emb = backbone(torch.randn(1, 1, 32, 32))
    assert emb.shape == (1, 192) and torch.isfinite(emb).all()
    return history


def test_ddp_two_processes_shard_the_data_and_resume_after_sigusr1(prepared, tmp_path):
    """devices=2 on CPU: Lightning starts the second process, gloo connects them, each rank sees half the images
    per epoch. SIGUSR1 to rank 0 stops both at the same step with a checkpoint; the re-run completes."""
    epochs, batch = 6, 2
    steps_per_epoch = N_TRAIN // (batch * 2)
    cfg = dict(PRETRAIN_CFG, epochs=epochs, batch_size=batch, devices=2)
    cmd = cli(prepared, tmp_path, cfg)

    rc, err = run_and_signal(cmd, tmp_path, signal.SIGUSR1)
    assert rc == 128 + signal.SIGUSR1 == 138, err
    work = work_checkpoint(tmp_path)
    saved = torch.load(work, map_location="cpu", weights_only=False)
    assert check_message(err, signal.SIGUSR1, work) == saved["global_step"] > 0
    assert saved["hyper_parameters"]["steps_per_epoch"] == steps_per_epoch
    assert saved["hyper_parameters"]["world_batch"] == batch * 2  # the lr scaling rule sees both ranks' images
    assert not (tmp_path / "last.ckpt").exists()

    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    history = check_outputs(tmp_path, epochs, steps_per_epoch)
    kept = saved["history"]
    assert list(history["time_s"][: len(kept)]) == pytest.approx([r["time_s"] for r in kept], rel=0, abs=1e-9)


def test_sigterm_saves_mid_epoch_and_the_rerun_resumes_at_that_step(prepared, tmp_path):
    """One process, SIGTERM (SIGUSR1 takes the same path: see the DDP test): status 143, a checkpoint at the
    step reached, and pretrain() again continues from that step to exactly epochs x steps_per_epoch steps."""
    sig, epochs, batch = signal.SIGTERM, 10, 2
    steps_per_epoch = N_TRAIN // batch  # 9: a signal almost always lands mid-epoch
    cfg = dict(PRETRAIN_CFG, epochs=epochs, batch_size=batch)
    cmd = cli(prepared, tmp_path, cfg)

    # A signal during an epoch's last step saves at that epoch's end instead (also correct); signal again then.
    for _ in range(3):
        rc, err = run_and_signal(cmd, tmp_path, sig)
        assert rc == 128 + sig == 143, err
        work = work_checkpoint(tmp_path)
        saved = torch.load(work, map_location="cpu", weights_only=False)
        assert check_message(err, sig, work) == saved["global_step"]
        if saved["global_step"] % steps_per_epoch:
            break
    else:
        pytest.fail("three signals in a row arrived during an epoch's last step")
    step, kept = saved["global_step"], saved["history"]
    assert kept and step > kept[-1]["step"]  # saved mid-epoch, after the last epoch boundary
    assert saved["partial_epoch"]["stats"]["steps"] == step - kept[-1]["step"]
    assert set(saved["partial_epoch"]["stats"]["sums"]) >= {"train_loss", "crops", "crop_rejects"}
    assert not (tmp_path / "last.ckpt").exists()

    handler = signal.getsignal(sig)
    pretrain(prepared, tmp_path, "dino", cfg, MODEL_CFG, device="cpu", threads=2, progress=False)
    assert signal.getsignal(sig) is handler  # pretrain() restores the handlers it replaced

    history = check_outputs(tmp_path, epochs, steps_per_epoch)
    # Epochs finished before the signal keep the first process's clock: restored, not recomputed.
    assert list(history["time_s"][: len(kept)]) == pytest.approx([r["time_s"] for r in kept], rel=0, abs=1e-9)
    # The interrupted epoch continues its clock from the checkpoint.
    interrupted = history.iloc[len(kept)]
    assert interrupted["time_s"] >= kept[-1]["time_s"] + saved["partial_epoch"]["elapsed_s"]
