"""Collapse and instability guard for self-distillation.

DINO's two failure modes (Caron et al. 2021, section 5.3) both make every image's teacher distribution equal to
the batch mean: uniform collapse (the loss sits at ln K and the teacher's entropy at ln K) and one-prototype
dominance (entropy near 0). Their common signature is a vanishing KL divergence between each teacher distribution
and the batch mean, KL = H(mean) - mean(H); the guard watches that and the loss, after the warm-ups, and stops
training with one clear line instead of letting a collapsed run spend a week of GPU time.

A third failure leaves the head's statistics healthy: dimensional collapse, where the backbone's features span only
a few directions. On monitored epochs the guard compares the effective rank of the teacher backbone's features with
the untrained network's (``effective_rank`` / ``effective_rank_init`` in the epoch's row) and warns or stops.
"""
from __future__ import annotations

import math
import sys
from typing import Any, Callable

import torch

from ssl4sci.ssl.losses import teacher_targets


class TrainingCollapsed(RuntimeError):
    """Training collapsed; the message is one line saying how and what to change."""


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or infinite; no checkpoint is written after the step it first did."""


@torch.no_grad()
def teacher_statistics(teacher_logits: list[torch.Tensor], center: torch.Tensor,
                       temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean per-image entropy, mean KL to the batch-mean distribution) of the centred, sharpened teacher, in nats,
    as 0-d tensors on the logits' device (reading them is the caller's choice: it waits for the device)."""
    probs = teacher_targets(torch.cat(teacher_logits).float(), center.float(), temperature)
    log_probs = torch.log(probs.clamp_min(1e-12))
    entropy = -(probs * log_probs).sum(dim=-1).mean()
    mean = probs.mean(dim=0)
    entropy_of_mean = -(mean * torch.log(mean.clamp_min(1e-12))).sum()
    return entropy, (entropy_of_mean - entropy).clamp_min(0.0)


class CollapseGuard:
    """Decides, once per epoch, whether training has collapsed for ``patience_epochs`` epochs in a row."""

    def __init__(self, out_dim: int, cfg: dict[str, Any], warmup_epochs: int,
                 warn: Callable[[str], None] | None = None):
        self.ln_k = math.log(out_dim)
        self.patience = int(cfg["patience_epochs"])
        self.start_epoch = int(cfg["start_epoch"]) if cfg["start_epoch"] is not None else int(warmup_epochs)
        self.loss_tolerance = float(cfg["loss_tolerance"])
        self.min_teacher_kl = float(cfg["min_teacher_kl"])
        self.rank_action = str(cfg["rank_action"])
        self.min_rank_ratio = float(cfg["min_rank_ratio"])
        self.warn = warn or (lambda message: print(message, file=sys.stderr, flush=True))
        self.streak = 0
        self.rank_streak = 0  # consecutive *monitored* epochs below min_rank_ratio (not every epoch has a rank)

    def symptom(self, row: dict[str, float]) -> str | None:
        """What looks collapsed in one epoch's statistics, or None."""
        loss = row.get("view_loss", row["train_loss"])  # EsViT: the view-level term is the one bounded by ln K
        kl, entropy = row.get("teacher_kl", math.nan), row.get("teacher_entropy", math.nan)
        if abs(loss - self.ln_k) < self.loss_tolerance * self.ln_k:
            return f"the loss sits at ln(out_dim) = {self.ln_k:.3f} ({loss:.4f}): the outputs are uniform"
        if kl < self.min_teacher_kl:
            kind = "one prototype dominates" if entropy < 0.5 * self.ln_k else "the teacher is uniform"
            return (f"every image gets the same teacher distribution ({kind}: entropy {entropy:.3f} nats, "
                    f"KL to the batch mean {kl:.2e} < {self.min_teacher_kl:g})")
        return None

    def check(self, row: dict[str, float]) -> str | None:
        """The message to stop with, or None; counts consecutive collapsed epochs from ``start_epoch`` on.

        Dimensional collapse with ``rank_action: warn`` passes its one-line message to ``warn`` instead."""
        if row["epoch"] < self.start_epoch:
            return None
        symptom = self.symptom(row)
        self.streak = self.streak + 1 if symptom else 0
        if symptom and self.streak >= self.patience:
            return (f"training collapsed at epoch {int(row['epoch'])} ({self.streak} epochs in a row): {symptom}; "
                    "try a lower pretrain.base_lr, a longer pretrain.warmup_teacher_temp_epochs, a lower "
                    "pretrain.teacher_temp or a higher pretrain.center_momentum (or set pretrain.guard.enabled: false)")
        return self.check_rank(row)

    def check_rank(self, row: dict[str, float]) -> str | None:
        """Dimensional collapse: the stop message (``rank_action: stop``) or None; epochs without a rank are skipped."""
        rank, initial = row.get("effective_rank", math.nan), row.get("effective_rank_init", math.nan)
        if self.rank_action == "ignore" or not (math.isfinite(rank) and math.isfinite(initial) and initial > 0):
            return None
        ratio = rank / initial
        self.rank_streak = self.rank_streak + 1 if ratio < self.min_rank_ratio else 0
        if self.rank_streak < self.patience:
            return None
        message = (f"dimensional collapse at epoch {int(row['epoch'])} ({self.rank_streak} monitored epochs in a row): "
                   f"the teacher backbone's features have effective rank {rank:.1f}, {ratio:.2f} x the untrained "
                   f"network's {initial:.1f} (pretrain.guard.min_rank_ratio = {self.min_rank_ratio:g}); try a lower "
                   "pretrain.base_lr, a larger pretrain.out_dim or stronger augmentations (pretrain.augment)")
        if self.rank_action == "stop":
            return message + " (or set pretrain.guard.rank_action: warn)"
        if self.rank_streak == self.patience:  # one line when it starts, not one per monitored epoch
            self.warn(f"warning: {message} (pretrain.guard.rank_action: stop ends such runs)")
        return None

    def state_dict(self) -> dict[str, int]:
        return {"streak": self.streak, "rank_streak": self.rank_streak}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.streak = int(state.get("streak", 0))
        self.rank_streak = int(state.get("rank_streak", 0))
