"""Shared tiny fixtures: a raw folder of synthetic ring images in the layout every source writes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ssl4sci.io import write_npy, write_parquet

CLASSES = ("no_sub", "cdm", "axion")


def make_raw(out: Path, n_per_class: int = 12, size: int = 40, seed: int = 0, channels: int = 1) -> Path:
    """Rings whose radius depends on the class, on a noisy dark sky; truth and arc masks alongside."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    images, masks, rows = [], [], []
    for ci, label in enumerate(CLASSES):
        for _ in range(n_per_class):
            radius = size * (0.15 + 0.08 * ci) + rng.normal(scale=0.5)
            clean = np.exp(-((np.hypot(yy, xx) - radius) ** 2) / 3.0)
            noisy = clean + 0.05 * rng.normal(size=clean.shape)
            images.append(np.repeat(noisy[None], channels, axis=0).astype(np.float32))
            masks.append(clean > 0.1)
            rows.append({"id": f"sim-{len(rows):06d}", "label": label, "index": len(rows),
                         "log10_m_axion": rng.uniform(-24, -22) if label == "axion" else np.nan})
    out.mkdir(parents=True, exist_ok=True)
    write_npy(out / "images.npy", np.stack(images))
    write_npy(out / "arc_masks.npy", np.stack(masks))
    write_parquet(out / "truth.parquet", pd.DataFrame(rows))
    write_parquet(out / "rejects.parquet", pd.DataFrame({"path": pd.Series(dtype=str), "reason": pd.Series(dtype=str)}))
    return out


PREPARE_CFG = {
    "image_size": 32, "crop": "dataset", "signal_sigma": 3.0, "crop_margin": 0.15, "intensity": "minmax",
    "split": {"train": 0.5, "val": 0.25, "test": 0.25}, "seed": 0, "shard_size": 7, "dtype": "float16",
    "samples_per_class": 3,
    "max_reject_fraction": 0.5,  # the fixtures hold deliberately broken files
}

MODEL_CFG = {"name": "vit_tiny_patch16_224", "patch_size": 8, "depth": 2, "drop_path_rate": 0.0}
SWIN_CFG = {**MODEL_CFG, "name": "swin_tiny_patch4_window7_224", "patch_size": 4, "window_size": 4, "embed_dim": 24,
            "depths": [2, 2], "num_heads": [2, 4]}


def default_section(section: str, **overrides):
    """A config section as the schema fills it in (what a job receives), with overrides."""
    from ssl4sci.config import validate_config

    return {**validate_config({})[section], **overrides}


@pytest.fixture
def one_torch_thread():
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """A prepared data/ folder (prepare stage run for real on the synthetic rings)."""
    from ssl4sci.prepare import prepare

    root = tmp_path_factory.mktemp("prepared")
    raw = make_raw(root / "raw", n_per_class=12)
    prepare(raw, root / "data", dict(PREPARE_CFG), source="test")
    return root / "data"


# --------------------------------------------------------------------------- SLURM
def slurm_cluster_answers() -> str | None:
    """None when a SLURM cluster with cpu and gpu partitions answers (scripts/slurm-test-cluster.sh), else why not."""
    import shutil
    import subprocess

    if shutil.which("sinfo") is None:
        return "sinfo not found (start one with: sudo scripts/slurm-test-cluster.sh start)"
    proc = subprocess.run(["sinfo", "--noheader", "--format", "%P %a"], capture_output=True, text=True)
    if proc.returncode != 0 or "gpu" not in proc.stdout or "cpu" not in proc.stdout:
        return f"no SLURM cluster with cpu and gpu partitions answers ({(proc.stderr or proc.stdout).strip()[:200]})"
    return None


@pytest.fixture(scope="session")
def cluster():
    """Skips with a reason when no SLURM cluster answers; fails instead when REQUIRE_SLURM=1 (set by .ci/run)."""
    import os

    reason = slurm_cluster_answers()
    if reason:
        if os.environ.get("REQUIRE_SLURM") == "1":
            pytest.fail(f"REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)


# --------------------------------------------------------------------------- DeepLense layout, local HTTP
def write_deeplense_folder(root: Path, images: dict[str, list[np.ndarray]], rng: np.random.Generator) -> Path:
    """The published DeepLense layout: one folder per class of .npy images; axion files ("axion", or the older
    "vort") hold an (image, axion mass in eV) object pair, as the published files do."""
    for label, arrays in images.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(arrays):
            if label in ("axion", "vort"):
                pair = np.empty(2, dtype=object)
                pair[0], pair[1] = image, 10 ** rng.uniform(-24, -22)
                np.save(root / label / f"{label}_sim_{i}.npy", pair, allow_pickle=True)
            else:
                np.save(root / label / f"{label}_sim_{i}.npy", image)
    return root


@pytest.fixture
def no_proxy(monkeypatch):
    """Requests to a test server on 127.0.0.1 go straight there, whatever proxy the machine sets."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


# --------------------------------------------------------------------------- running the workflow
REPO = Path(__file__).resolve().parents[1]


def snakemake_command(workdir: Path, configfile: Path, *args: str, profile: str | None = None) -> list[str]:
    """``snakemake`` on this repository's Snakefile in ``workdir``, with a profile (``local``, ``slurm``) or not."""
    import sys

    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(configfile)]
    return cmd + (["--profile", str(REPO / "profiles" / profile)] if profile else []) + list(args)


def env_with_cli() -> dict:
    """The environment for a workflow run: the jobs find the ``ssl4sci`` CLI of this interpreter's environment."""
    import os
    import sys

    return dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])


def run_snakemake(workdir: Path, configfile: Path, *args: str, check: bool = True):
    """A local run on 2 cores, one thread per job (the micro jobs are dominated by imports); raises with the log
    tails when ``check`` and the run fails."""
    import subprocess

    cmd = snakemake_command(workdir, configfile, "--max-threads", "1", "--cores", "2", *args)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env_with_cli(), cwd=workdir)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def planned_jobs(proc) -> dict[str, int]:
    """Rule -> job count from the 'Job stats' table of a dry run."""
    import re

    text = proc.stdout + proc.stderr
    if "Nothing to be done" in text:
        return {}
    jobs = {}
    for line in text.split("Job stats:", 1)[1].splitlines()[3:]:
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if not m:
            break
        if m.group(1) not in ("total", "all"):
            jobs[m.group(1)] = int(m.group(2))
    return jobs


# The whole DAG in about two minutes on 2 cores: tiny images, one-block ViT, one epoch, both methods.
MICRO = {
    "experiment": "micro",
    "device": "cpu",
    "simulate": {"n_per_class": 10, "n_unlabelled": 6, "image_size": 32, "pixel_scale": 0.2, "seed": 3},
    "prepare": {"image_size": 32, "split": {"train": 0.6, "val": 0.1, "test": 0.3}, "shard_size": 16,
                "samples_per_class": 2},
    "model": {"patch_size": 8, "depth": 1},
    "pretrain": {"methods": ["dino", "esvit"], "epochs": 1, "batch_size": 8, "out_dim": 64, "head_hidden_dim": 32,
                 "head_bottleneck_dim": 16, "global_crop_size": 32, "local_crop_size": 16, "local_crops_number": 2,
                 "num_workers": 0, "warmup_epochs": 0,
                 "esvit": {"model": {"name": "swin_tiny_patch4_window7_224", "patch_size": 4, "window_size": 4,
                                     "embed_dim": 24, "depths": [2, 2], "num_heads": [2, 4]}}},
    "embed": {"batch_size": 32},
    "finetune": {"methods": ["dino", "esvit", "random_init"], "epochs": 1, "batch_size": 8},
    "attention": {"images_per_class": 1, "score_images": 6},
    "label_efficiency": {"finetune": {"steps": 2, "batch_size": 4, "warmup_steps": 0}},
}


def deeplense_folder(root: Path, n_per_class: int = 8, size: int = 40, seed: int = 0) -> Path:
    """Rings whose radius depends on the class, on a noisy sky, in the published DeepLense layout."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    images = {label: [(np.exp(-((np.hypot(yy, xx) - size * (0.15 + 0.08 * ci)) ** 2) / 3.0)
                       + 0.05 * rng.normal(size=(size, size))).astype(np.float32) for _ in range(n_per_class)]
              for ci, label in enumerate(CLASSES)}
    return write_deeplense_folder(root, images, rng)


def deeplense_config(folder: Path) -> dict:
    """MICRO on a DeepLense folder, with the site setting a 2-core laptop or node wants: two one-thread jobs."""
    import copy

    return {**copy.deepcopy(MICRO), "experiment": "dl", "source": "deeplense", "deeplense": {"path": str(folder)},
            "slurm": {"max_threads": 1}}
