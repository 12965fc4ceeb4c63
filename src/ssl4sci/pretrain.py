"""Pretrain stage: self-supervised training of a ViT on the prepared training split and the unlabelled pool.

Pretraining is the only stage that reads the pool (manifest split ``unlabelled``); ``pretrain.max_unlabelled``
takes all of it (null), none (0) or a seeded subset, so its size can be ablated without re-simulating.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler

from ssl4sci.data import UNLABELLED, ImageDataset, PreparedData, seeded_subset
from ssl4sci.io import atomic_path
from ssl4sci.preemption import Preempted, SignalFlag, WorkCheckpoint, save_checkpoint_atomic, spawned_by_lightning
from ssl4sci.registry import load
from ssl4sci.registry.methods import METHODS
from ssl4sci.runtime import cluster_plugins, launched_externally, setup_process, trainer_kwargs
from ssl4sci.ssl.augment import MultiCrop
from ssl4sci.ssl.curves import plot_loss
from ssl4sci.ssl.guard import NonFiniteLoss, TrainingCollapsed
from ssl4sci.ssl.monitor import KNNMonitor


def _config_hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def pretrain_rows(data: PreparedData, cfg: dict[str, Any]) -> pd.DataFrame:
    """The manifest rows pretraining reads, in manifest order: the train split and the unlabelled pool, the
    latter cut to a seeded subset of ``cfg['max_unlabelled']`` images (null = all of it, 0 = none)."""
    limit = cfg["max_unlabelled"]
    pool = data.rows([UNLABELLED])
    if limit is not None:
        pool = seeded_subset(pool, int(limit), cfg["seed"])
    split = data.manifest["split"]
    return data.manifest[(split == "train") | data.manifest.index.isin(pool.index)]


def method_class(method: str) -> type[pl.LightningModule]:
    """The LightningModule class of ``method`` (``registry.methods.METHODS``), imported now."""
    if method not in METHODS:
        raise ValueError(f"config key 'pretrain.methods': unknown method '{method}', expected one of "
                         f"{', '.join(METHODS)}")
    return load(METHODS[method])


def pretrain(data_dir: str | Path, out_dir: str | Path, method: str, cfg: dict[str, Any], model_cfg: dict[str, Any],
             device: str, threads: int = 1, progress: bool = True) -> Path:
    """Train ``method``; write last.ckpt, metrics.csv and loss.png into out_dir. Returns the checkpoint path.

    ``cfg["devices"] * cfg["nodes"]`` > 1 trains with DDP (see ``runtime.trainer_kwargs``); only global rank 0
    writes the outputs. SIGTERM or SIGUSR1 (SLURM's notice before it kills or requeues a job) saves the work
    checkpoint at the next step and raises ``Preempted``; the same call again resumes from that step.
    """
    module_class = method_class(method)
    out_dir = Path(out_dir)
    devices, nodes = cfg["devices"], cfg["nodes"]
    world = devices * nodes
    plugins = cluster_plugins(devices, nodes)  # checks SLURM's task count before any work
    # --threads is what one process may use under srun (each task has its own CPUs); when Lightning starts
    # the processes of this node itself, they share it.
    per_process_threads = threads if world == 1 or launched_externally(devices, nodes) else max(1, threads // devices)
    setup_process(per_process_threads, cfg["seed"])
    data = PreparedData(data_dir)
    train_rows, counts = training_images(data, cfg, world)
    batch_size = min(cfg["batch_size"], len(train_rows) // world)

    # Work checkpoints live in a folder keyed by the settings: a re-run with the same settings resumes,
    # a re-run with changed settings starts fresh instead of continuing a different experiment.
    resume = out_dir / "work" / _config_hash(cfg, model_cfg, data.stats) / "last.ckpt"
    signals = SignalFlag()
    trainer = _trainer(cfg, WorkCheckpoint(resume, signals), plugins, device, progress)
    if trainer.is_global_zero:
        print(f"ssl4sci pretrain: {method} on {len(train_rows)} images: n_train={counts['n_train']} (train split), "
              f"n_unlabelled={counts['n_unlabelled']} (of {len(data.rows([UNLABELLED]))} in the unlabelled pool)",
              file=sys.stderr, flush=True)
    loader = multicrop_loader(data, train_rows, cfg, batch_size, trainer.world_size, trainer.global_rank)
    monitor = KNNMonitor(data, cfg["monitor"], batch_size=max(batch_size, 64), seed=cfg["seed"]) \
        if cfg["monitor"]["every_epochs"] else None
    module = module_class(cfg, model_cfg, data.channels, data.image_size, steps_per_epoch=len(loader),
                          world_batch=batch_size * world, monitor=monitor, data_counts=counts)
    if world > 1:
        torch.manual_seed(cfg["seed"] + trainer.global_rank)  # same initial weights, different augmentations per rank
    _fit(trainer, module, loader, resume, signals)
    return _write_outputs(trainer, module, out_dir, method, cfg)


def training_images(data: PreparedData, cfg: dict[str, Any], world: int) -> tuple[pd.DataFrame, dict[str, int]]:
    """The rows pretraining reads (:func:`pretrain_rows`) and their counts ``n_train`` (train split) and
    ``n_unlabelled`` (pool); at least two images per process, or a ValueError."""
    rows = pretrain_rows(data, cfg)
    n_unlabelled = int((rows["split"] == UNLABELLED).sum())
    if len(rows) < 2 * world:
        on = f" on {world} processes" if world > 1 else ""
        raise ValueError(f"{data.dir / 'manifest.parquet'}: the train split and the unlabelled pool have {len(rows)} "
                         f"images; pretraining{on} needs at least {2 * world}")
    return rows, {"n_train": len(rows) - n_unlabelled, "n_unlabelled": n_unlabelled}


def _trainer(cfg: dict[str, Any], work_ckpt: WorkCheckpoint, plugins: list, device: str, progress: bool) -> pl.Trainer:
    """The Lightning trainer, writing into the work folder of ``work_ckpt``; checks that the launcher started
    ``devices x nodes`` processes."""
    devices, nodes = cfg["devices"], cfg["nodes"]
    trainer = pl.Trainer(
        max_epochs=cfg["epochs"],
        max_steps=cfg["max_steps"] or -1,
        gradient_clip_val=cfg["clip_grad"] or None,
        logger=False,
        default_root_dir=work_ckpt.path.parent,
        callbacks=[work_ckpt],
        enable_progress_bar=progress,
        use_distributed_sampler=False,  # the loader below is sharded already (world > 1) or needs no sharding
        plugins=plugins or None,
        **trainer_kwargs(device, cfg["precision"], devices, nodes),
    )
    if trainer.world_size != devices * nodes:
        raise ValueError(f"config keys 'pretrain.devices' x 'pretrain.nodes' = {devices * nodes} processes, but the "
                         f"launcher started {trainer.world_size} (WORLD_SIZE)")
    return trainer


def multicrop_loader(data: PreparedData, rows: pd.DataFrame, cfg: dict[str, Any], batch_size: int, world_size: int,
                     rank: int) -> DataLoader:
    """Batches of multi-crop views of ``rows``, rank ``rank``'s share of them when ``world_size`` > 1."""
    multicrop = MultiCrop(cfg, data.stats["mean"], data.stats["std"], cfg["augment"]["domain"])
    dataset = ImageDataset(data, rows, transform=multicrop, raw=True)  # the multi-crop normalises each view last
    sampler = None
    if world_size > 1:
        # Every rank draws a disjoint slice of one seeded permutation per epoch; drop_last on the sampler makes
        # steps per epoch len(train) // (batch_size * world), the same rule as one process with drop_last.
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg["seed"],
                                     drop_last=True)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg["num_workers"],
        persistent_workers=cfg["num_workers"] > 0,
        pin_memory=torch.cuda.is_available(),
    )


def _fit(trainer: pl.Trainer, module: pl.LightningModule, loader: DataLoader, resume: Path,
         signals: SignalFlag) -> None:
    """Train, from the work checkpoint ``resume`` where there is one, with SIGTERM/SIGUSR1 caught; a collapse or a
    non-finite loss names the checkpoint kept, a preemption is reported once (rank 0)."""
    signals.install()
    try:
        with warnings.catch_warnings():
            # Resuming from a preemption checkpoint: Lightning continues the step and batch counters and runs
            # the epoch's remaining number of batches from a fresh pass over the loader; it warns that the
            # loader cannot fast-forward, which is expected here.
            warnings.filterwarnings("ignore",
                                    message=".*resuming from a checkpoint that ended before the epoch ended.*")
            trainer.fit(module, loader, ckpt_path=resume if resume.exists() else None)
    except (NonFiniteLoss, TrainingCollapsed) as stop:
        # Nothing of the failing step or epoch was saved: the work checkpoint is the last good one.
        kept = f"the last good checkpoint is {resume} (kept; a re-run with changed settings starts fresh)" \
            if resume.exists() else "no epoch had finished, so there is no checkpoint"
        raise type(stop)(f"{stop}; {kept}") from None
    except Preempted as stop:
        if trainer.is_global_zero:
            print(f"ssl4sci pretrain: {stop}", file=sys.stderr, flush=True)
        if spawned_by_lightning(trainer):
            # Lightning's launcher SIGKILLs rank 0 when a process it started exits non-zero; rank 0 reports.
            stop.code = 0
        raise
    finally:
        signals.restore()


def _write_outputs(trainer: pl.Trainer, module: pl.LightningModule, out_dir: Path, method: str,
                   cfg: dict[str, Any]) -> Path:
    """last.ckpt (every rank takes part), and on rank 0 metrics.csv and loss.png; the work folder goes."""
    ckpt_path = out_dir / "last.ckpt"
    save_checkpoint_atomic(trainer, ckpt_path)
    if trainer.is_global_zero:
        history = pd.DataFrame(module.history)
        with atomic_path(out_dir / "metrics.csv") as tmp:
            history.to_csv(tmp, index=False)
        guard = cfg["guard"]
        rank_checked = guard["enabled"] and guard["rank_action"] != "ignore"
        plot_loss(history, out_dir / "loss.png", method, guard["min_rank_ratio"] if rank_checked else None)
        shutil.rmtree(out_dir / "work", ignore_errors=True)
    return ckpt_path
