"""A full disk while writing shards or checkpoints: one line naming the file, exit status 2, no partial file.

Two ways to fill the disk. In process, the lowest write a stage makes (numpy's array writer, Lightning's
checkpoint save) writes part of its bytes and then fails the way the kernel or numpy reports it. Where the
machine allows a private mount namespace (``unshare``), the real CLI also runs with its output on a tmpfs of a
few KiB, so the error comes from the kernel itself, including for memory-mapped files (which, unreserved, die
with SIGBUS instead of raising).
"""
from __future__ import annotations

import errno
import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import MODEL_CFG, PREPARE_CFG, default_section, make_raw

from ssl4sci import io as ssl_io
from ssl4sci.cli import main

PRETRAIN_CFG = default_section(
    "pretrain", epochs=2, batch_size=8, out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16, global_crop_size=32,
    local_crop_size=16, local_crops_number=2, warmup_epochs=1, precision="32-true", num_workers=0,
    monitor={**default_section("pretrain")["monitor"], "every_epochs": 0},
)
NO_SPACE = "no space left on device"


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(lines) == 1, lines
    return lines[0]


def _fail_on_call(n: int, real, partial_write):
    """Wrap ``real`` so that its n-th call writes part of its output and then fails (n counts from 1)."""
    calls = {"n": 0}

    @functools.wraps(real)
    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] != n:
            return real(*args, **kwargs)
        partial_write(*args, **kwargs)
        raise wrapper.error

    wrapper.calls = calls
    return wrapper


# --------------------------------------------------------------------------- shards (prepare)

def _half_array(fid, arr, *args, **kwargs):
    fid.write(np.ascontiguousarray(arr).tobytes()[: arr.nbytes // 2])


@pytest.mark.parametrize("how", ["ENOSPC", "numpy short write"])
def test_shard_write_fails_part_way_one_line_and_nothing_left(tmp_path, monkeypatch, capsys, how):
    raw = make_raw(tmp_path / "raw", n_per_class=12)
    results = tmp_path / "results"
    results.mkdir()  # prepare keeps its temporary folder beside data/
    failing = _fail_on_call(3, np.lib.format.write_array, _half_array)  # shard 0, its arc masks, then shard 1
    if how == "ENOSPC":  # what the kernel says through a Python write, pyarrow, json or matplotlib
        failing.error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    else:  # numpy's ndarray.tofile on a full disk: no errno, only the byte counts; the disk is full at that moment
        failing.error = OSError("3584 requested and 1024 written")
        monkeypatch.setattr(ssl_io.shutil, "disk_usage", lambda p: SimpleNamespace(total=10**9, used=10**9, free=0))
    monkeypatch.setattr(np.lib.format, "write_array", failing)

    args = ["prepare", "--cfg", json.dumps(PREPARE_CFG), "--raw", str(raw), "--out", str(results / "data"),
            "--source", "simulate"]
    assert main(args) == 2
    line = _error_line(capsys)
    assert re.fullmatch(rf"ssl4sci prepare: error: {NO_SPACE} while writing {re.escape(str(results))}/\.prepare-\w+/"
                        r"shards/shard-00001\.npy; free some space and run again", line), line
    assert failing.calls["n"] == 3 and _files(results) == [] and list(results.iterdir()) == []

    monkeypatch.undo()  # space freed: the same command finishes
    assert main(args) == 0
    assert {"manifest.parquet", "stats.json", "shards/shard-00005.npy"} <= set(_files(results / "data"))


def test_disk_full_is_told_apart_from_other_write_errors(tmp_path):
    target = tmp_path / "x.npy"
    for code in (errno.ENOSPC, errno.EDQUOT):
        found = ssl_io.disk_full_error(OSError(code, os.strerror(code)), target)
        assert (found.errno, found.filename) == (code, str(target))
    # A short write, or torch's writer failing, on a disk with room left is some other fault: not relabelled.
    assert ssl_io.disk_full_error(OSError("10 requested and 3 written"), target) is None
    assert ssl_io.disk_full_error(RuntimeError("PytorchStreamWriter failed writing file"), target) is None
    assert ssl_io.disk_full_error(OSError(errno.EACCES, "Permission denied"), target) is None
    assert ssl_io.disk_full_error(KeyboardInterrupt(), target) is None


def test_other_write_errors_keep_their_traceback(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "data"))

    raw = make_raw(tmp_path / "raw", n_per_class=4)
    monkeypatch.setattr(np.lib.format, "write_array", denied)
    with pytest.raises(PermissionError):
        main(["prepare", "--cfg", json.dumps(PREPARE_CFG), "--raw", str(raw), "--out", str(tmp_path / "data"),
              "--source", "simulate"])


# --------------------------------------------------------------------------- checkpoints (pretrain)

def _half_checkpoint(trainer, filepath, *args, **kwargs):
    Path(filepath).write_bytes(b"PK\x03\x04 half a checkpoint")


@pytest.mark.parametrize(("failing_call", "expect"), [(2, "work"), (3, "final")])
def test_checkpoint_write_fails_part_way_keeps_the_last_good_one(prepared, tmp_path, monkeypatch, capsys, failing_call,
                                                                  expect):
    """Calls: 1 = epoch 0's work checkpoint, 2 = epoch 1's, 3 = the final last.ckpt."""
    import pytorch_lightning as pl

    failing = _fail_on_call(failing_call, pl.Trainer.save_checkpoint, _half_checkpoint)
    failing.error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(pl.Trainer, "save_checkpoint", failing)
    out = tmp_path / "pretrain"
    args = ["pretrain", "--cfg", json.dumps(PRETRAIN_CFG), "--model", json.dumps(MODEL_CFG), "--data", str(prepared),
            "--method", "dino", "--out", str(out), "--device", "cpu", "--no-progress"]
    assert main(args) == 2
    line = _error_line(capsys)
    work = [p for p in (out / "work").iterdir()]
    assert len(work) == 1  # one settings hash
    written = work[0] / "last.ckpt" if expect == "work" else out / "last.ckpt"
    assert line == f"ssl4sci pretrain: error: {NO_SPACE} while writing {written}; free some space and run again"
    rel = str((work[0] / "last.ckpt").relative_to(out))
    assert _files(out) == [rel]  # the last good work checkpoint only: no partial or temporary file
    kept = torch.load(work[0] / "last.ckpt", map_location="cpu", weights_only=False)
    assert kept["epoch"] == failing_call - 2  # the epoch before the one whose save failed

    monkeypatch.undo()  # space freed: the run resumes from the kept checkpoint and finishes
    assert main(args) == 0
    assert {"last.ckpt", "metrics.csv", "loss.png"} <= set(_files(out))


# --------------------------------------------------------------------------- a real full filesystem

@functools.lru_cache(maxsize=1)
def _private_mount_prefix() -> tuple[str, ...] | None:
    """An ``unshare`` command line that may mount a tmpfs, or None where the machine does not allow one."""
    if shutil.which("unshare") is None:
        return None
    probe = Path(os.environ.get("TMPDIR", "/tmp"))
    for prefix in (("unshare", "--mount"), ("unshare", "--user", "--map-root-user", "--mount")):
        proc = subprocess.run([*prefix, "sh", "-c", 'mount -t tmpfs -o size=4k tmpfs "$1"', "sh", str(probe)],
                              capture_output=True)
        if proc.returncode == 0:
            return prefix
    return None


def _on_full_disk(mount: Path, size: str, command: list[str]) -> tuple[int, str, list[str]]:
    """Run ``command`` with a ``size`` tmpfs on ``mount``; return its exit status, stderr and the files left there."""
    prefix = _private_mount_prefix()
    if prefix is None:
        pytest.skip("no private mount namespace here (unshare): the in-process tests above cover the same paths")
    mount.mkdir(parents=True, exist_ok=True)
    script = ('mount -t tmpfs -o size="$1" tmpfs "$2" || exit 99; shift 2; "$@"; echo "rc=$?" >&2; '
              'find "$MOUNT" -mindepth 1 -type f >&2')
    env = {**os.environ, "MOUNT": str(mount)}
    proc = subprocess.run([*prefix, "sh", "-c", script, "sh", size, str(mount), *command], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    rc_at = max(i for i, line in enumerate(lines) if line.startswith("rc="))
    return int(lines[rc_at][3:]), "\n".join(lines[:rc_at]), lines[rc_at + 1:]


def test_prepare_on_a_real_full_disk(tmp_path):
    raw = make_raw(tmp_path / "raw", n_per_class=12)
    mount = tmp_path / "full"
    cmd = [sys.executable, "-m", "ssl4sci.cli", "prepare", "--cfg", json.dumps(PREPARE_CFG), "--raw", str(raw),
           "--out", str(mount / "data"), "--source", "simulate"]
    rc, err, left = _on_full_disk(mount, "24k", cmd)
    assert rc == 2 and left == [], (err, left)
    last = err.splitlines()[-1]
    assert re.fullmatch(rf"ssl4sci prepare: error: {NO_SPACE} while writing {re.escape(str(mount))}/\S+; "
                        r"free some space and run again", last), err


def test_simulate_memmap_on_a_real_full_disk_fails_cleanly_not_with_sigbus(tmp_path):
    """images.npy is a memory map: unreserved, its first page write past the free space kills the process."""
    cfg = default_section("simulate", n_per_class=2, image_size=64, supersampling_factor=1)
    mount = tmp_path / "full"
    cmd = [sys.executable, "-m", "ssl4sci.cli", "fetch", "--source", "simulate", "--cfg", json.dumps(cfg),
           "--out", str(mount / "raw")]
    rc, err, left = _on_full_disk(mount, "48k", cmd)
    assert rc == 2 and left == [], (err, left)
    images = mount / "raw" / "images.npy"
    assert err.splitlines()[-1] == (f"ssl4sci fetch: error: {NO_SPACE} while writing {images}; "
                                    "free some space and run again")
