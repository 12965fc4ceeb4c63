"""Process set-up shared by the training stages: threads, seeds, Lightning trainer arguments."""
from __future__ import annotations

import logging
import os
import warnings

import torch

from ssl4sci.models import pick_device


def setup_process(threads: int, seed: int) -> None:
    """Threads and seeds for a stage process. Seeds torch, numpy and random without importing
    Lightning (its import alone costs seconds in every short job)."""
    import random

    import numpy as np

    torch.set_num_threads(max(1, threads))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, threads)))
    # What Lightning's seed_everything(workers=True) records: its DataLoader workers seed from these.
    os.environ["PL_GLOBAL_SEED"] = str(seed)
    os.environ["PL_SEED_WORKERS"] = "1"
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # Lightning's advice banners are noise in a pipeline log; real warnings still show.
    logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def trainer_kwargs(device: str, precision: str = "32-true") -> dict:
    """Accelerator and precision for pl.Trainer; autocast only on GPU (CPU runs fp32)."""
    dev = pick_device(device)
    on_gpu = dev.type == "cuda"
    return dict(
        accelerator="gpu" if on_gpu else "cpu",
        devices=1,
        precision=precision if on_gpu else "32-true",
        enable_model_summary=False,
        log_every_n_steps=1,
    )
