"""Self-supervised losses as pure modules (state = the running centre only)."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class DINOLoss(nn.Module):
    """Cross-entropy between the sharpened, centred teacher and the student, over all view pairs but identical ones.

    ``forward`` is pure given the centre; ``update_center`` moves the centre by EMA of the teacher's batch mean
    (all-reduced across processes, so every rank keeps the same centre).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_views: list[torch.Tensor], teacher_views: list[torch.Tensor], teacher_temp: float) -> torch.Tensor:
        targets = [F.softmax((t - self.center) / teacher_temp, dim=-1).detach() for t in teacher_views]
        log_probs = [F.log_softmax(s / self.student_temp, dim=-1) for s in student_views]
        total, pairs = 0.0, 0
        for iq, q in enumerate(targets):
            for iv, logp in enumerate(log_probs):
                if iv == iq:  # the first student views are the same global crops the teacher saw
                    continue
                total = total + torch.sum(-q * logp, dim=-1).mean()
                pairs += 1
        return total / pairs

    @torch.no_grad()
    def update_center(self, teacher_views: list[torch.Tensor]) -> None:
        teacher = torch.cat(teacher_views).float()
        batch_sum = teacher.sum(dim=0, keepdim=True)
        count = torch.tensor([teacher.shape[0]], device=teacher.device, dtype=torch.float32)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_sum)
            dist.all_reduce(count)
        batch_center = batch_sum / count
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))
