"""Pretrain stage: self-supervised training of a ViT on the prepared training split and the unlabelled pool.

Pretraining is the only stage that reads the pool (manifest split ``unlabelled``); ``pretrain.max_unlabelled``
takes all of it (null), none (0) or a seeded subset, so its size can be ablated without re-simulating.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler

from ssl4sci.data import UNLABELLED, ImageDataset, PreparedData, seeded_subset
from ssl4sci.io import atomic_path, save_figure
from ssl4sci.runtime import cluster_plugins, launched_externally, setup_process, trainer_kwargs
from ssl4sci.ssl.augment import MultiCrop
from ssl4sci.ssl.dino import DINO
from ssl4sci.ssl.esvit import EsViT
from ssl4sci.ssl.guard import NonFiniteLoss, TrainingCollapsed
from ssl4sci.ssl.monitor import KNNMonitor

METHODS = {"dino": DINO, "esvit": EsViT}


def _config_hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def pretrain_rows(data: PreparedData, cfg: dict[str, Any]) -> pd.DataFrame:
    """The manifest rows pretraining reads, in manifest order: the train split and the unlabelled pool, the
    latter cut to a seeded subset of ``cfg['max_unlabelled']`` images (null = all of it, 0 = none)."""
    limit = cfg.get("max_unlabelled")
    pool = data.rows([UNLABELLED])
    if limit is not None:
        pool = seeded_subset(pool, int(limit), cfg["seed"])
    split = data.manifest["split"]
    return data.manifest[(split == "train") | data.manifest.index.isin(pool.index)]


def pretrain(data_dir: str | Path, out_dir: str | Path, method: str, cfg: dict[str, Any], model_cfg: dict[str, Any],
             device: str = "auto", threads: int = 1, progress: bool = True) -> Path:
    """Train ``method``; write last.ckpt, metrics.csv and loss.png into out_dir. Returns the checkpoint path.

    ``cfg["devices"] * cfg["nodes"]`` > 1 trains with DDP (see ``runtime.trainer_kwargs``); only global rank 0
    writes the outputs. SIGTERM or SIGUSR1 (SLURM's notice before it kills or requeues a job) saves the work
    checkpoint at the next step and raises ``Preempted``; the same call again resumes from that step.
    """
    import pytorch_lightning as pl

    if method not in METHODS:
        raise ValueError(f"config key 'pretrain.methods': unknown method '{method}', expected one of {', '.join(METHODS)}")
    out_dir = Path(out_dir)
    devices, nodes = int(cfg.get("devices", 1)), int(cfg.get("nodes", 1))
    if devices < 1 or nodes < 1:
        raise ValueError(f"config keys 'pretrain.devices' and 'pretrain.nodes' must be >= 1, got {devices} and {nodes}")
    world = devices * nodes
    plugins = cluster_plugins(devices, nodes)  # checks SLURM's task count before any work
    # --threads is what one process may use under srun (each task has its own CPUs); when Lightning starts
    # the processes of this node itself, they share it.
    per_process_threads = threads if world == 1 or launched_externally(devices, nodes) else max(1, threads // devices)
    setup_process(per_process_threads, cfg["seed"])
    data = PreparedData(data_dir)
    train_rows = pretrain_rows(data, cfg)
    n_unlabelled = int((train_rows["split"] == UNLABELLED).sum())
    counts = {"n_train": len(train_rows) - n_unlabelled, "n_unlabelled": n_unlabelled}
    if len(train_rows) < 2 * world:
        on = f" on {world} processes" if world > 1 else ""
        raise ValueError(f"{data.dir / 'manifest.parquet'}: the train split and the unlabelled pool have {len(train_rows)} "
                         f"images; pretraining{on} needs at least {2 * world}")
    batch_size = min(cfg["batch_size"], len(train_rows) // world)

    # Work checkpoints live in a folder keyed by the settings: a re-run with the same settings resumes,
    # a re-run with changed settings starts fresh instead of continuing a different experiment.
    work_dir = out_dir / "work" / _config_hash(cfg, model_cfg, data.stats)
    resume = work_dir / "last.ckpt"
    signals = _SignalFlag()
    work_ckpt = WorkCheckpoint(resume, signals)
    trainer = pl.Trainer(
        max_epochs=cfg["epochs"],
        max_steps=cfg["max_steps"] or -1,
        gradient_clip_val=cfg["clip_grad"] or None,
        logger=False,
        default_root_dir=work_dir,
        callbacks=[work_ckpt],
        enable_progress_bar=progress,
        use_distributed_sampler=False,  # the loader below is sharded already (world > 1) or needs no sharding
        plugins=plugins or None,
        **trainer_kwargs(device, cfg["precision"], devices, nodes),
    )
    if trainer.world_size != world:
        raise ValueError(f"config keys 'pretrain.devices' x 'pretrain.nodes' = {world} processes, but the launcher "
                         f"started {trainer.world_size} (WORLD_SIZE)")
    if trainer.is_global_zero:
        print(f"ssl4sci pretrain: {method} on {len(train_rows)} images: n_train={counts['n_train']} (train split), "
              f"n_unlabelled={n_unlabelled} (of {len(data.rows([UNLABELLED]))} in the unlabelled pool)",
              file=sys.stderr, flush=True)

    dataset = ImageDataset(data, train_rows, transform=MultiCrop(cfg, data.stats["mean"], data.stats["std"], cfg["augment"]["domain"]))
    sampler = None
    if world > 1:
        # Every rank draws a disjoint slice of one seeded permutation per epoch; drop_last on the sampler makes
        # steps per epoch len(train) // (batch_size * world), the same rule as one process with drop_last.
        sampler = DistributedSampler(dataset, num_replicas=world, rank=trainer.global_rank, shuffle=True,
                                     seed=cfg["seed"], drop_last=True)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg["num_workers"],
        persistent_workers=cfg["num_workers"] > 0,
        pin_memory=torch.cuda.is_available(),
    )
    monitor = KNNMonitor(data, cfg["monitor"], batch_size=max(batch_size, 64), seed=cfg["seed"]) if cfg["monitor"]["every_epochs"] else None
    module = METHODS[method](cfg, model_cfg, data.channels, data.image_size, steps_per_epoch=len(loader),
                             world_batch=batch_size * world, monitor=monitor, data_counts=counts)
    if world > 1:
        torch.manual_seed(cfg["seed"] + trainer.global_rank)  # same initial weights, different augmentations per rank

    signals.install()
    try:
        with warnings.catch_warnings():
            # Resuming from a preemption checkpoint: Lightning continues the step and batch counters and runs
            # the epoch's remaining number of batches from a fresh pass over the loader; it warns that the
            # loader cannot fast-forward, which is expected here.
            warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")
            trainer.fit(module, loader, ckpt_path=resume if resume.exists() else None)
    except (NonFiniteLoss, TrainingCollapsed) as stop:
        # Nothing of the failing step or epoch was saved: the work checkpoint is the last good one.
        kept = f"the last good checkpoint is {resume} (kept; a re-run with changed settings starts fresh)" if resume.exists() \
            else "no epoch had finished, so there is no checkpoint"
        raise type(stop)(f"{stop}; {kept}") from None
    except Preempted as stop:
        if trainer.is_global_zero:
            print(f"ssl4sci pretrain: {stop}", file=sys.stderr, flush=True)
        if _spawned_by_lightning(trainer):
            # Lightning's launcher SIGKILLs rank 0 when a process it started exits non-zero; rank 0 reports.
            stop.code = 0
        raise
    finally:
        signals.restore()

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


def save_checkpoint_atomic(trainer, path: Path) -> None:
    """``trainer.save_checkpoint`` onto ``path`` via a temporary file. Every rank must call it (it is collective);
    only global rank 0 writes and renames."""
    if trainer.is_global_zero:
        with atomic_path(path) as tmp:
            trainer.save_checkpoint(tmp, weights_only=False)
    else:
        trainer.save_checkpoint(path, weights_only=False)  # writes nothing on this rank; takes part in the barrier


class Preempted(SystemExit):
    """SIGTERM or SIGUSR1 stopped pretraining after the work checkpoint was written at the step reached.

    Running the same pretraining again resumes from that step. A ``SystemExit``: the process ends with ``code``,
    128 + the signal number as a shell reports death by that signal (143 for SIGTERM, 138 for SIGUSR1), without
    a traceback; ``str()`` is the one-line message ``pretrain`` prints on rank 0.
    """

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        super().__init__(128 + int(signum))
        self.signum, self.step = int(signum), step
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None

    def __str__(self) -> str:
        saved = f"checkpoint saved to {self.checkpoint}" if self.checkpoint else "nothing trained yet, no checkpoint"
        return f"pretraining interrupted by {signal.Signals(self.signum).name} at step {self.step}; {saved}; re-run to resume"


class _SignalFlag:
    """Handlers for SIGTERM and SIGUSR1 that only record the first signal; training acts on it between steps."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread; a worker thread trains unprotected
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def reinstall(self) -> None:
        """Take the signals back from Lightning, which sets its own SIGTERM handler right before training
        (it would stop without a checkpoint, or requeue the job under SLURM)."""
        if threading.current_thread() is threading.main_thread():
            for sig in self._previous:
                signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}


def _spawned_by_lightning(trainer) -> bool:
    from lightning_fabric.plugins.environments import LightningEnvironment

    return trainer.world_size > 1 and trainer.local_rank > 0 and type(trainer.strategy.cluster_environment) is LightningEnvironment


class WorkCheckpoint(pl.callbacks.Checkpoint):
    """The resumable checkpoint in the work folder, written atomically at the end of every epoch -- and, once a
    SIGTERM/SIGUSR1 arrived, at the next step, after which training stops with ``Preempted``.

    A ``Checkpoint`` subclass, so Lightning calls its epoch-end hook after the module's own
    (the epoch's history row is in the file).
    """

    def __init__(self, path: Path, signals: _SignalFlag | None = None):
        self.path = Path(path)
        self.signals = signals
        self._stop: int | None = None  # the signal every rank agreed to stop for

    def _save(self, trainer) -> None:
        # atomic_path: a failed write (a full disk) leaves the previous epoch's checkpoint and no partial file.
        save_checkpoint_atomic(trainer, self.path)

    def _check_signal(self, trainer) -> None:
        """Collective under DDP: a signal may reach the ranks at different steps (or rank 0 only)."""
        if self.signals is None or self._stop is not None:
            return
        signum = self.signals.signum or 0
        if trainer.world_size > 1:
            signum = int(trainer.strategy.reduce(torch.tensor(signum, device=trainer.strategy.root_device), reduce_op="max"))
        if signum:
            self._stop = signum

    def on_train_start(self, trainer, pl_module) -> None:
        if self.signals is None:
            return
        self.signals.reinstall()
        self._check_signal(trainer)
        if self._stop is not None:  # signalled during set-up: nothing trained in this process, nothing to save
            raise Preempted(self._stop, trainer.global_step, self.path if self.path.exists() else None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._check_signal(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # Saving here rather than at the previous batch end: that step is complete, including the teacher's
        # EMA update (the module's batch-end hook, which Lightning calls after the callbacks').
        if self._stop is not None:
            self._save(trainer)
            raise Preempted(self._stop, trainer.global_step, self.path)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._check_signal(trainer)
        self._save(trainer)
        finished = trainer.current_epoch + 1 >= trainer.max_epochs or 0 < trainer.max_steps <= trainer.global_step
        if self._stop is not None and not finished:
            raise Preempted(self._stop, trainer.global_step, self.path)


def plot_loss(history: pd.DataFrame, path: Path, method: str, min_rank_ratio: float | None = None) -> None:
    """Training loss per epoch with the online k-NN accuracy on the validation split (top panel), and the
    effective rank of the teacher backbone's features against the untrained network's (bottom panel), where
    they were measured; ``min_rank_ratio`` draws the guard's threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, rank_ax) = plt.subplots(2, 1, figsize=(5.5, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    if len(history):
        ax.plot(history["epoch"] + 1, history["train_loss"], marker="o", ms=3, label="training loss")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    measured = history.dropna(subset=["knn_val"]) if "knn_val" in history else history.iloc[:0]
    if len(measured):
        knn_ax = ax.twinx()
        knn_ax.plot(measured["epoch"] + 1, measured["knn_val"], color="tab:orange", marker="s", ms=3, label="k-NN val")
        knn_ax.set_ylabel("k-NN top-1 (val)", color="tab:orange")
        knn_ax.set_ylim(0, 1)
    ax.set_title(f"{method}: pretraining loss, online k-NN and effective rank")
    _plot_rank(rank_ax, history, min_rank_ratio)
    rank_ax.set_xlabel("epoch")
    save_figure(path, fig)


def _plot_rank(ax, history: pd.DataFrame, min_rank_ratio: float | None) -> None:
    """Effective rank per monitored epoch, the untrained network's as a reference, PC1's variance share on the right."""
    ax.set_ylabel("effective rank")
    ax.grid(alpha=0.3)
    measured = history.dropna(subset=["effective_rank"]) if "effective_rank" in history else history.iloc[:0]
    if not len(measured):
        ax.text(0.5, 0.5, "effective rank not measured (pretrain.monitor)", ha="center", va="center",
                transform=ax.transAxes, color="grey")
        return
    ax.plot(measured["epoch"] + 1, measured["effective_rank"], color="tab:green", marker="o", ms=3,
            label="effective rank")
    initial = history["effective_rank_init"].dropna() if "effective_rank_init" in history else []
    if len(initial):
        ax.axhline(float(initial.iloc[0]), color="grey", ls="--", lw=1, label="untrained")
        if min_rank_ratio:
            ax.axhline(min_rank_ratio * float(initial.iloc[0]), color="tab:red", ls=":", lw=1,
                       label=f"guard: {min_rank_ratio:g} x untrained")
    highest = max([float(measured["effective_rank"].max())] + [float(v) for v in initial])
    ax.set_ylim(0, 1.15 * highest)
    ax.legend(loc="lower left", fontsize=7)
    if "pc1_share" in measured:
        share_ax = ax.twinx()
        share_ax.plot(measured["epoch"] + 1, measured["pc1_share"], color="tab:purple", marker="^", ms=3)
        share_ax.set_ylabel("PC1 variance share", color="tab:purple")
        share_ax.set_ylim(0, 1)
