"""A killed job never leaves a result that looks finished, and the next run redoes it.

Two layers are relied upon and tested by killing real processes: the project's writers (temporary file, then rename),
so a process killed mid-write leaves nothing at the output path; and Snakemake's incomplete-output markers, so a job
whose Snakemake died under it is redone even when the job itself ran on and wrote every file.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, env_with_cli, snakemake_command

CONFIG = {"experiment": "kill", "device": "cpu",
          "simulate": {"n_per_class": 8, "image_size": 32, "pixel_scale": 0.2, "seed": 1},
          "prepare": {"image_size": 32, "split": {"train": 0.6, "val": 0.1, "test": 0.3}, "shard_size": 16},
          "model": {"patch_size": 8, "depth": 1},
          "pretrain": {"methods": ["dino"], "epochs": 4, "batch_size": 8, "out_dim": 64, "head_hidden_dim": 32,
                       "head_bottleneck_dim": 16, "global_crop_size": 32, "local_crop_size": 16,
                       "local_crops_number": 2, "num_workers": 0, "warmup_epochs": 0},
          "slurm": {"max_threads": 1}}
CKPT = Path("results/kill/pretrain/dino/last.ckpt")


def snakemake(workdir: Path, *args: str) -> list[str]:
    return snakemake_command(workdir, workdir / "kill.yaml", "--cores", "2", *args)


def pids_of(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out if int(p) != os.getpid()]


def start_and_wait_for_pretrain(workdir: Path) -> subprocess.Popen:
    (workdir / "kill.yaml").write_text(yaml.safe_dump(CONFIG))
    proc = subprocess.Popen(snakemake(workdir, str(CKPT)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env_with_cli(), cwd=workdir, start_new_session=True)
    deadline = time.monotonic() + 300
    while not pids_of("bin/ssl4sci pretrain") and time.monotonic() < deadline:
        assert proc.poll() is None, "snakemake ended before pretraining started"
        time.sleep(0.1)
    time.sleep(3)  # into the imports and the first steps
    return proc


@pytest.mark.e2e
def test_snakemake_killed_under_a_running_job_redoes_that_job(tmp_path):
    """Snakemake dies (SIGKILL, as on a lost login node); its job runs on and writes every output. Those outputs
    look finished, yet the next run redoes the job: Snakemake marked them incomplete when the job started."""
    proc = start_and_wait_for_pretrain(tmp_path)
    orphans = pids_of("bin/ssl4sci pretrain")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 300
    while any(Path(f"/proc/{pid}").exists() for pid in orphans) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (tmp_path / CKPT).is_file(), "the orphaned job should have finished its outputs"

    def plain_run(*args: str) -> str:
        proc = subprocess.run(snakemake(tmp_path, *args), capture_output=True, text=True, env=env_with_cli(),
                              cwd=tmp_path)
        return f"exit {proc.returncode}\n{proc.stdout}{proc.stderr}"

    # The outputs look finished, but Snakemake knows they are not, and says which.
    out = plain_run(str(CKPT))
    assert not out.startswith("exit 0") and "incomplete" in out.lower() and str(CKPT) in out
    # Its lock outlived it too; lifting it is one command, which Snakemake names when it refuses to start.
    assert plain_run("--unlock").startswith("exit 0")

    rerun = subprocess.run(snakemake(tmp_path, "--profile", str(REPO / "profiles" / "local"), str(CKPT)),
                           capture_output=True, text=True, env=env_with_cli(), cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "rule pretrain:" in rerun.stdout + rerun.stderr


@pytest.mark.e2e
def test_a_job_killed_with_its_snakemake_leaves_no_output_and_is_redone(tmp_path):
    """The whole run dies at once (node loss) mid-training: no output of the job exists, and after --unlock the
    next run redoes it. (A kill in the middle of writing a file: the writer test below.)"""
    proc = start_and_wait_for_pretrain(tmp_path)
    for pid in pids_of("bin/ssl4sci pretrain"):
        os.kill(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run(snakemake(tmp_path, "--unlock"), capture_output=True, env=env_with_cli(), cwd=tmp_path, check=True)
    out_dir = (tmp_path / CKPT).parent
    assert not any((out_dir / name).exists() for name in ("last.ckpt", "metrics.csv", "loss.png"))

    rerun = subprocess.run(snakemake(tmp_path, "--profile", str(REPO / "profiles" / "local"), str(CKPT)),
                           capture_output=True, text=True, env=env_with_cli(), cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "rule pretrain:" in rerun.stdout + rerun.stderr and (tmp_path / CKPT).is_file()


def test_a_writer_killed_mid_write_leaves_nothing_at_the_output_path(tmp_path):
    """SIGKILL while io.write_npy streams 400 MB: the output path never exists; only a hidden temporary file does."""
    target = tmp_path / "images.npy"
    script = textwrap.dedent(f"""
        import numpy as np
        from ssl4sci.io import write_npy
        write_npy({str(target)!r}, np.ones((100, 1000, 1000), dtype=np.float32))
    """)
    writer = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        partial = [p for p in tmp_path.iterdir() if p.name.startswith(".images.npy.") and p.stat().st_size > 0]
        if partial:
            break
        time.sleep(0.005)
    writer.kill()
    writer.wait()
    assert partial, "the writer never started writing"
    assert not target.exists()
    assert all(p.name.startswith(".") and p.name.endswith(".tmp.npy") for p in tmp_path.iterdir())
