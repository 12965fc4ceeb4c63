"""Self-supervised losses as pure modules (state = the running centre only).

* ``DINOLoss`` (Caron et al., 2021): view level, one output per image and view.
* ``RegionLoss`` (EsViT, Li et al., 2022): region level, one output per patch token; every student token learns
  the teacher's distribution at the teacher token whose backbone feature is most similar to its own.

Both share the teacher's target (``teacher_targets``), the student's log-probabilities (``student_log_probs``, once
per view), the per-pair term (``soft_cross_entropy``) and the centre's EMA (``ema_center``).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def teacher_targets(teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """The teacher's centred, sharpened distribution softmax((t - centre) / teacher_temp), detached."""
    return F.softmax((teacher_logits - center) / teacher_temp, dim=-1).detach()


def student_log_probs(student_logits: torch.Tensor, student_temp: float) -> torch.Tensor:
    """log softmax(s / student_temp), computed once per student view and shared by all its pairs."""
    return F.log_softmax(student_logits / student_temp, dim=-1)


def soft_cross_entropy(teacher_probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """The per-pair term: mean over every leading dimension of -sum_k q_k log p_k (shapes (..., K)), with
    ``log_probs`` from ``student_log_probs``."""
    return torch.sum(-teacher_probs * log_probs, dim=-1).mean()


@torch.no_grad()
def ema_center(center: torch.Tensor, rows: torch.Tensor, momentum: float) -> None:
    """center <- momentum * center + (1 - momentum) * mean of ``rows`` (N, K), the mean taken over every process."""
    total = rows.float().sum(dim=0, keepdim=True)
    count = torch.tensor([rows.shape[0]], device=rows.device, dtype=torch.float32)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
        dist.all_reduce(count)
    center.mul_(momentum).add_(total / count * (1 - momentum))


def _check_views(n_student: int, n_teacher: int, what: str) -> None:
    if n_teacher == 0 or n_student == 0 or (n_student == 1 and n_teacher == 1):
        raise ValueError(f"{what}: needs at least one pair of different views, got {n_student} student "
                         f"and {n_teacher} teacher views")
    if n_teacher > n_student:
        raise ValueError(f"{what}: the teacher's views must be the first student views, got {n_teacher} teacher "
                         f"and {n_student} student views")


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

    def forward(self, student_views: list[torch.Tensor], teacher_views: list[torch.Tensor],
                teacher_temp: float) -> torch.Tensor:
        targets = [teacher_targets(t, self.center, teacher_temp) for t in teacher_views]
        log_probs = [student_log_probs(s, self.student_temp) for s in student_views]
        total, pairs = 0.0, 0
        for iq, q in enumerate(targets):
            for iv, logp in enumerate(log_probs):
                if iv == iq:  # the first student views are the same global crops the teacher saw
                    continue
                total = total + soft_cross_entropy(q, logp)
                pairs += 1
        return total / pairs

    @torch.no_grad()
    def update_center(self, teacher_views: list[torch.Tensor]) -> None:
        ema_center(self.center, torch.cat(teacher_views), self.center_momentum)


@torch.no_grad()
def match_tokens(student_feats: torch.Tensor, teacher_feats: torch.Tensor) -> torch.Tensor:
    """For every student token, the index of the same image's teacher token of highest cosine similarity.

    student_feats (B, N, D), teacher_feats (B, M, D) -> LongTensor (B, N) of indices in [0, M).
    """
    if student_feats.ndim != 3 or teacher_feats.ndim != 3 or student_feats.shape[0] != teacher_feats.shape[0] \
            or student_feats.shape[-1] != teacher_feats.shape[-1]:
        raise ValueError(f"match_tokens: expected (B, N, D) and (B, M, D) features, got {tuple(student_feats.shape)} "
                         f"and {tuple(teacher_feats.shape)}")
    s = F.normalize(student_feats.detach().float(), dim=-1)
    t = F.normalize(teacher_feats.detach().float(), dim=-1)
    return torch.bmm(s, t.transpose(1, 2)).argmax(dim=-1)


class RegionLoss(nn.Module):
    """EsViT's region-level loss: every student token against the teacher's distribution at its best-matching token.

    For each teacher (global) view t and student view v != t, each student token is matched (``match_tokens``)
    to the teacher token of the same image whose backbone feature is most similar; its loss is the cross-entropy
    between the teacher's centred, sharpened region-head distribution there and the student's. The loss is the
    mean over tokens and images, then over pairs. Views may have different token counts (local crops).
    ``update_center`` moves the region centre by EMA of the teacher's mean over images and tokens.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_proj: list[torch.Tensor], student_feats: list[torch.Tensor],
                teacher_proj: list[torch.Tensor], teacher_feats: list[torch.Tensor],
                teacher_temp: float) -> torch.Tensor:
        """student_proj[v] (B, N_v, K), student_feats[v] (B, N_v, D); teacher_proj[t] (B, M, K),
        teacher_feats[t] (B, M, D)."""
        if len(student_proj) != len(student_feats) or len(teacher_proj) != len(teacher_feats):
            raise ValueError(f"RegionLoss: one feature tensor per projection, got {len(student_proj)} student "
                             f"projections / {len(student_feats)} features, {len(teacher_proj)} teacher projections / "
                             f"{len(teacher_feats)} features")
        _check_views(len(student_proj), len(teacher_proj), "RegionLoss")
        for what, projs, feats in (("student", student_proj, student_feats), ("teacher", teacher_proj, teacher_feats)):
            for i, (p, f) in enumerate(zip(projs, feats)):
                if p.ndim != 3 or f.ndim != 3 or p.shape[:2] != f.shape[:2]:
                    raise ValueError(f"RegionLoss: {what} view {i}: expected (B, N, K) projections and (B, N, D) "
                                     f"features, got {tuple(p.shape)} and {tuple(f.shape)}")
        targets = [teacher_targets(t, self.center, teacher_temp) for t in teacher_proj]
        log_probs = [student_log_probs(s, self.student_temp) for s in student_proj]
        total, pairs = 0.0, 0
        for iq, (q, t_feats) in enumerate(zip(targets, teacher_feats)):
            for iv, (logp, s_feats) in enumerate(zip(log_probs, student_feats)):
                if iv == iq:  # the first student views are the same global crops the teacher saw
                    continue
                index = match_tokens(s_feats, t_feats)  # (B, N_v)
                # -sum_k q[b, index[b, n], k] logp[b, n, k] for every student token, without gathering a (B, N_v, K)
                # copy of the targets per pair (K is 65,536 in the full-size configs): cross entropies against every
                # teacher token (B, N_v, M), then the matched one.
                cross = torch.bmm(logp, q.transpose(1, 2).to(logp.dtype))
                total = total - cross.gather(2, index.unsqueeze(-1)).mean()
                pairs += 1
        return total / pairs

    @torch.no_grad()
    def update_center(self, teacher_proj: list[torch.Tensor]) -> None:
        ema_center(self.center, torch.cat([t.reshape(-1, t.shape[-1]) for t in teacher_proj]), self.center_momentum)


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo regulariser (Sablayrolles et al. 2019; DINOv2): minus the mean log distance of each L2-normalised
    feature to its nearest neighbour in the batch.

    Why: self-distillation can keep its head's outputs spread over the prototypes while the backbone features live
    in a few directions (dimensional collapse); pushing every feature away from its nearest neighbour spreads them
    over the sphere. Lower is more spread. ``features`` is (B, D) with B >= 2.
    """
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"koleo_loss: expected (B >= 2, D) features, got shape {tuple(features.shape)}")
    x = F.normalize(features.float(), dim=-1, eps=eps)
    distances = torch.cdist(x, x)
    # 4 exceeds the unit sphere's diameter: an image is never its own nearest neighbour
    distances = distances + torch.eye(len(x), device=x.device, dtype=x.dtype) * 4.0
    return -torch.log(distances.min(dim=1).values + eps).mean()
