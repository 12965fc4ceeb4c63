"""Preemption of a training run: SIGTERM or SIGUSR1 (SLURM's notice before it kills or requeues a job) saves the
work checkpoint at the next step and stops with :class:`Preempted`; running the same training again resumes there.

The pieces: :class:`SignalFlag` records the signal (its handler only sets a flag; training acts on it between
steps), :class:`WorkCheckpoint` is the Lightning callback that writes the resumable checkpoint every epoch and on
a signal, and :func:`save_checkpoint_atomic` writes a checkpoint so that a failed write leaves no partial file.
"""
from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from ssl4sci.io import atomic_path


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
        return (f"pretraining interrupted by {signal.Signals(self.signum).name} at step {self.step}; {saved}; "
                "re-run to resume")


class SignalFlag:
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


def spawned_by_lightning(trainer) -> bool:
    """True in a process that Lightning's own launcher started (not rank 0, not under srun or torchrun)."""
    from lightning_fabric.plugins.environments import LightningEnvironment

    return (trainer.world_size > 1 and trainer.local_rank > 0
            and type(trainer.strategy.cluster_environment) is LightningEnvironment)


class WorkCheckpoint(pl.callbacks.Checkpoint):
    """The resumable checkpoint in the work folder, written atomically at the end of every epoch -- and, once a
    SIGTERM/SIGUSR1 arrived, at the next step, after which training stops with ``Preempted``.

    A ``Checkpoint`` subclass, so Lightning calls its epoch-end hook after the module's own
    (the epoch's history row is in the file).
    """

    def __init__(self, path: Path, signals: SignalFlag | None):
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
            signum = int(trainer.strategy.reduce(torch.tensor(signum, device=trainer.strategy.root_device),
                                                 reduce_op="max"))
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
