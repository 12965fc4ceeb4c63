"""A training epoch's statistics, summed on the training device: the host reads them only when asked.

Why: reading a number off a GPU (``.item()``, ``float()``) waits for every kernel queued before it, so a step that
reads its loss cannot overlap with the next one. The step adds its values here as device tensors; the host reads the
sums every ``pretrain.sync_every_steps`` steps and at the end of the epoch. The loss's finiteness is recorded the
same way: the first non-finite step, its loss and its epoch stay on the device until :meth:`check_finite` reads them.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ssl4sci.ssl.guard import NonFiniteLoss

SUM_ONLY = ("crops", "crop_rejects")
"""Counts summed over the epoch, not averaged per step (the share of rejected crops is their ratio)."""

Reduce = Callable[[torch.Tensor], torch.Tensor]  # the sum over every process (identity for one)


class RunningStats:
    """Per-key sums over an epoch's steps (float64 on the device), the step count, and the first non-finite loss."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self._first_bad: torch.Tensor | None = None  # (step, epoch, loss) of the first non-finite loss; step -1: none

    def add(self, values: dict[str, torch.Tensor], loss: torch.Tensor, step: int, epoch: int) -> None:
        """One step's values (0-d tensors on the device) and its loss; nothing is read back to the host."""
        for key, value in values.items():
            value = value.detach().to(torch.float64)
            self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
        self.steps += 1
        loss = loss.detach().to(torch.float64)
        if self._first_bad is None:
            self._first_bad = torch.full((3,), -1.0, dtype=torch.float64, device=loss.device)
        here = torch.stack([torch.full_like(loss, step), torch.full_like(loss, epoch), loss])
        fresh = (self._first_bad[0] < 0) & ~torch.isfinite(loss)
        self._first_bad = torch.where(fresh, here, self._first_bad)

    def check_finite(self, method: str, reduce: Reduce | None = None) -> None:
        """Raise ``NonFiniteLoss`` naming the first non-finite step, on every process if any had one (collective
        under DDP: every process must call it at the same step)."""
        if self._first_bad is None:
            return
        bad = (self._first_bad[0] >= 0).to(torch.float64)
        if reduce is not None:
            bad = reduce(bad)
        if bad.item() > 0:
            step, epoch, loss = self._first_bad.tolist()
            if step < 0:  # another process's loss was non-finite
                raise NonFiniteLoss(f"{method} loss is not finite on another process (epoch {int(epoch)})")
            raise NonFiniteLoss(f"{method} loss is {loss} at step {int(step)} (epoch {int(epoch)})")

    def means(self, reduce: Reduce | None = None) -> dict[str, float]:
        """Per-step means of every key (sums for the counts), over every process's steps; reads the device."""
        keys = sorted(self.sums)
        if not keys:
            return {}
        packed = torch.stack([self.sums[k] for k in keys] + [torch.full_like(self.sums[keys[0]], self.steps)])
        if reduce is not None:
            packed = reduce(packed)
        values = packed.tolist()
        steps = values.pop()
        return {k: v if k in SUM_ONLY else (v / steps if steps else math.nan) for k, v in zip(keys, values)}

    def state_dict(self) -> dict[str, Any]:
        return {"sums": {k: v.item() for k, v in self.sums.items()}, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.sums = {k: torch.tensor(v, dtype=torch.float64, device=device) for k, v in state["sums"].items()}
        self.steps = int(state["steps"])
