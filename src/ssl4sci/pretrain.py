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

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, RandomSampler

from ssl4sci.data import UNLABELLED, ImageDataset, PreparedData, StoredRows, raw_pixels, seeded_subset
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
    loader, device_views = training_batches(data, train_rows, cfg, batch_size, trainer.world_size,
                                            trainer.global_rank, trainer.strategy.root_device)
    monitor = KNNMonitor(data, cfg["monitor"], batch_size=max(batch_size, 64), seed=cfg["seed"]) \
        if cfg["monitor"]["every_epochs"] else None
    module = module_class(cfg, model_cfg, data.channels, data.image_size, steps_per_epoch=len(loader),
                          world_batch=batch_size * world, monitor=monitor, data_counts=counts)
    module.batch_transform = device_views
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


def training_batches(data: PreparedData, rows: pd.DataFrame, cfg: dict[str, Any], batch_size: int, world_size: int,
                     rank: int, device: torch.device) -> tuple[DataLoader, "DeviceViews | None"]:
    """Pretraining's loader for training on ``device``, and what its batches become there (the module's
    ``batch_transform``): ``DeviceViews`` when the views are cut on the device, None when the loader cuts them."""
    on_device, resident = view_placement(cfg, device, data, rows)
    loader = multicrop_loader(data, rows, cfg, batch_size, world_size, rank, on_device=on_device,
                              resident=resident is not None)
    return loader, DeviceViews(make_multicrop(data, cfg), resident) if on_device else None


def make_multicrop(data: PreparedData, cfg: dict[str, Any]) -> MultiCrop:
    """The multi-crop of ``cfg`` (the pretrain section) with the dataset's normalisation."""
    return MultiCrop(cfg, data.stats["mean"], data.stats["std"], cfg["augment"]["domain"])


def view_placement(cfg: dict[str, Any], device: torch.device, data: PreparedData,
                   rows: pd.DataFrame) -> tuple[bool, torch.Tensor | None]:
    """Whether the views are cut on ``device`` (``augment.on_device``, null = on a GPU), and the images of ``rows``
    copied there when ``data_on_device`` says so (null = on a GPU, when they take at most a quarter of its free
    memory), else None."""
    on_device = cfg["augment"]["on_device"]
    on_device = device.type == "cuda" if on_device is None else bool(on_device)
    keep = cfg["data_on_device"]
    if keep is None:
        stored_bytes = len(rows) * data.channels * data.image_size ** 2 * np.dtype(data.stats["dtype"]).itemsize
        keep = device.type == "cuda" and stored_bytes <= torch.cuda.mem_get_info(device)[0] / 4
    if keep and not on_device:
        raise ValueError("config keys 'pretrain.data_on_device' and 'pretrain.augment.on_device': images kept on the "
                         "device need the views cut there too (augment.on_device: true or null)")
    if not keep:
        return on_device, None
    images = data.stored_images(rows["shard"].to_numpy(), rows["index"].to_numpy())
    return on_device, torch.from_numpy(images).to(device)


class DeviceViews:
    """The views of a batch cut on the training device (``MomentumSSL.batch_transform``): from the stored images the
    loader copied there, or, with ``resident`` images, from those the loader's row positions pick. Stored uint8
    pixels are scaled to [0, 1] here (``data.raw_pixels``), as ``PreparedData.raw_image`` does on the CPU."""

    def __init__(self, multicrop: MultiCrop, resident: torch.Tensor | None):
        self.multicrop, self.resident = multicrop, resident

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor) -> tuple[dict, None]:
        stored = batch if self.resident is None else self.resident[batch]
        return self.multicrop(raw_pixels(stored)), None  # no labels: pretraining never reads them


def multicrop_loader(data: PreparedData, rows: pd.DataFrame, cfg: dict[str, Any], batch_size: int, world_size: int,
                     rank: int, on_device: bool = False, resident: bool = False) -> DataLoader:
    """Batches of multi-crop views of ``rows``, rank ``rank``'s share of them when ``world_size`` > 1.

    ``on_device``: batches of stored images instead (uint8 stays uint8 across the copy), whose views ``DeviceViews``
    cuts on the device; ``resident``: batches of row positions into the images already there. Every way draws the
    same seeded shuffle."""
    if on_device:  # whole batches, one read per shard: a batch sampler hands each item its row positions
        dataset = _RowPositions(len(rows)) if resident else StoredRows(data, rows)
    else:
        dataset = ImageDataset(data, rows, raw=True)  # the multi-crop normalises each view last
    sampler = None
    if world_size > 1:
        # Every rank draws a disjoint slice of one seeded permutation per epoch; drop_last on the sampler makes
        # steps per epoch len(train) // (batch_size * world), the same rule as one process with drop_last.
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg["seed"],
                                     drop_last=True)
    workers = 0 if resident else cfg["num_workers"]
    shared = {"num_workers": workers, "persistent_workers": workers > 0,
              "pin_memory": torch.cuda.is_available() and not resident}
    if on_device:
        batches = _EpochBatches(sampler or RandomSampler(dataset), batch_size, drop_last=True)
        return DataLoader(dataset, batch_size=None, sampler=batches, **shared)
    return DataLoader(dataset, batch_size=batch_size, shuffle=sampler is None, sampler=sampler, drop_last=True,
                      collate_fn=make_multicrop(data, cfg).collate, **shared)


class _EpochBatches(BatchSampler):
    """A batch sampler that passes Lightning's ``set_epoch`` on to its sampler: with ``batch_size=None`` the loader's
    ``sampler`` is this one, and a DistributedSampler that never hears of the epoch repeats its permutation."""

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


class _RowPositions(Dataset):
    """Batches of row positions into the images already on the device."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, positions: list[int]) -> torch.Tensor:
        return torch.as_tensor(positions, dtype=torch.long)


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
