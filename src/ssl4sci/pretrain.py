"""Pretrain stage: self-supervised training of a ViT on the prepared training split."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from ssl4sci.data import ImageDataset, PreparedData
from ssl4sci.io import atomic_path, save_figure
from ssl4sci.runtime import setup_process, trainer_kwargs
from ssl4sci.ssl.augment import MultiCrop
from ssl4sci.ssl.dino import DINO

METHODS = ("dino",)


def _config_hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def pretrain(data_dir: str | Path, out_dir: str | Path, method: str, cfg: dict[str, Any], model_cfg: dict[str, Any],
             device: str = "auto", threads: int = 1, progress: bool = True) -> Path:
    """Train ``method``; write last.ckpt, metrics.csv and loss.png into out_dir. Returns the checkpoint path."""
    import pytorch_lightning as pl

    if method not in METHODS:
        raise ValueError(f"config key 'pretrain.methods': unknown method '{method}', expected one of {METHODS}")
    out_dir = Path(out_dir)
    setup_process(threads, cfg["seed"])
    data = PreparedData(data_dir)
    train_rows = data.rows(["train"])
    if len(train_rows) < 2:
        raise ValueError(f"{data.dir / 'manifest.parquet'}: the train split has {len(train_rows)} images; pretraining needs at least 2")
    batch_size = min(cfg["batch_size"], len(train_rows))
    dataset = ImageDataset(data, train_rows, transform=MultiCrop(cfg))
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=cfg["num_workers"],
        persistent_workers=cfg["num_workers"] > 0,
        pin_memory=torch.cuda.is_available(),
    )
    module = DINO(cfg, model_cfg, data.channels, data.image_size, steps_per_epoch=len(loader), world_batch=batch_size)

    # Work checkpoints live in a folder keyed by the settings: a re-run with the same settings resumes,
    # a re-run with changed settings starts fresh instead of continuing a different experiment.
    work_dir = out_dir / "work" / _config_hash(cfg, model_cfg, data.stats)
    resume = work_dir / "last.ckpt"
    trainer = pl.Trainer(
        max_epochs=cfg["epochs"],
        max_steps=cfg["max_steps"] or -1,
        gradient_clip_val=cfg["clip_grad"] or None,
        logger=False,
        default_root_dir=work_dir,
        callbacks=[EpochCheckpoint(resume)],
        enable_progress_bar=progress,
        **trainer_kwargs(device, cfg["precision"]),
    )
    trainer.fit(module, loader, ckpt_path=resume if resume.exists() else None)

    ckpt_path = out_dir / "last.ckpt"
    with atomic_path(ckpt_path) as tmp:
        trainer.save_checkpoint(tmp)
    history = pd.DataFrame(module.history)
    with atomic_path(out_dir / "metrics.csv") as tmp:
        history.to_csv(tmp, index=False)
    plot_loss(history, out_dir / "loss.png", method)
    shutil.rmtree(out_dir / "work", ignore_errors=True)
    return ckpt_path


class EpochCheckpoint(pl.callbacks.Checkpoint):
    """Write a resumable checkpoint at the end of every epoch, atomically.

    A ``Checkpoint`` subclass, so Lightning calls it after the module's own epoch-end hook
    (the epoch's history row is in the file).
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        trainer.save_checkpoint(tmp)  # every rank calls it; only global rank 0 writes
        if trainer.is_global_zero:
            tmp.replace(self.path)


def plot_loss(history: pd.DataFrame, path: Path, method: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    if len(history):
        ax.plot(history["epoch"] + 1, history["train_loss"], marker="o", ms=3)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.set_title(f"{method}: pretraining loss")
    ax.grid(alpha=0.3)
    save_figure(path, fig)
