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
    "split": {"train": 0.5, "val": 0.25, "test": 0.25}, "seed": 0, "shard_size": 7, "dtype": "float16", "samples_per_class": 3,
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
