"""Self-supervised losses as pure modules (state = the running centre only).

* ``DINOLoss`` (Caron et al., 2021): view level, one output per image and view.
* ``RegionLoss`` (EsViT, Li et al., 2022): region level, one output per patch token; every student token learns
  the teacher's distribution at the teacher token whose backbone feature is most similar to its own.

Both share the teacher's target (``teacher_targets``), the student's log-probabilities (``student_log_probs``, once
per view; RegionLoss: per piece of a view), the per-pair term (``soft_cross_entropy``, DINOLoss) and the centre's
EMA (``ema_center``).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def teacher_targets(teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """The teacher's centred, sharpened distribution softmax((t - centre) / teacher_temp), detached."""
    return F.softmax((teacher_logits - center) / teacher_temp, dim=-1).detach()


def student_log_probs(student_logits: torch.Tensor, student_temp: float) -> torch.Tensor:
    """log softmax(s / student_temp), computed once per student view and shared by all its pairs."""
    return F.log_softmax(student_logits / student_temp, dim=-1)


def soft_cross_entropy(teacher_probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """The per-pair term: mean over every leading dimension of -sum_k q_k log p_k (shapes (..., K)), with
    ``log_probs`` from ``student_log_probs``."""
    # -(q * logp), not (-q) * logp: the product keeps the targets themselves for backward, not a negated copy
    return -torch.sum(teacher_probs * log_probs, dim=-1).mean()


@torch.no_grad()
def ema_center(center: torch.Tensor, rows: torch.Tensor | list[torch.Tensor], momentum: float) -> None:
    """center <- momentum * center + (1 - momentum) * mean of ``rows`` (N, K), or of the rows of a list of (..., K)
    tensors pooled, the mean taken over every process.

    Summed in fp32 part by part, without an fp32 or concatenated copy of the rows: the region head's are
    (B, M, K) per view, and this runs when the step's activations are all alive."""
    parts = [rows] if isinstance(rows, torch.Tensor) else list(rows)
    total = sum(p.reshape(-1, p.shape[-1]).sum(dim=0, keepdim=True, dtype=torch.float32) for p in parts)
    count = torch.tensor([sum(p.numel() // p.shape[-1] for p in parts)], device=center.device, dtype=torch.float32)
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

    The teacher's side comes first (``targets``, no gradient); ``forward`` takes the student's.

    Memory: the K-wide tensors (K is 65,536 in the full-size configs) exist a piece at a time: each view's images
    are split evenly into the fewest pieces whose K-wide tensors have at most ``piece_elements`` elements (one
    piece per view at small batches). The teacher's targets are made piece by piece and kept in its logits' dtype
    (bf16 under autocast, the dtype the cross-entropy's matmul runs in anyway). Each student piece's terms run in
    activation checkpointing, which keeps only the piece's input for backward (with ``head``, the backbone's
    tokens: the head's activations are not kept either) and recomputes the rest there; autograd would otherwise
    keep several (B, N_v, K) tensors of every view until backward.
    """

    # 2^26 elements: 256 MiB per K-wide fp32 tensor, small next to the backbone's activations
    piece_elements = 2**26

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_out: list[torch.Tensor], student_feats: list[torch.Tensor],
                targets: list[torch.Tensor], teacher_feats: list[torch.Tensor],
                head: nn.Module | None = None) -> torch.Tensor:
        """student_out[v]: the student's logits (B, N_v, K), or with ``head`` what it maps to them (EsViT: the
        tokens, its region head); student_feats[v] (B, N_v, D); targets[t] (B, M, K) from ``targets``,
        teacher_feats[t] (B, M, D)."""
        if len(student_out) != len(student_feats) or len(targets) != len(teacher_feats):
            raise ValueError(f"RegionLoss: one feature tensor per projection, got {len(student_out)} student "
                             f"projections / {len(student_feats)} features, {len(targets)} teacher targets / "
                             f"{len(teacher_feats)} features")
        _check_views(len(student_out), len(targets), "RegionLoss")
        for what, projs, feats in (("student", student_out, student_feats), ("teacher", targets, teacher_feats)):
            for i, (p, f) in enumerate(zip(projs, feats)):
                if p.ndim != 3 or f.ndim != 3 or p.shape[:2] != f.shape[:2]:
                    raise ValueError(f"RegionLoss: {what} view {i}: expected (B, N, K) projections and (B, N, D) "
                                     f"features, got {tuple(p.shape)} and {tuple(f.shape)}")
        total, pairs = 0.0, 0
        for iv, (s_out, s_feats) in enumerate(zip(student_out, student_feats)):
            # the first student views are the same global crops the teacher saw: no pair with their own teacher view
            partners = [iq for iq in range(len(targets)) if iq != iv]
            if not partners:
                continue
            indices = [match_tokens(s_feats, teacher_feats[iq]) for iq in partners]
            for rows in self._pieces(s_out):
                args = (s_out[rows], [targets[iq][rows] for iq in partners], [i[rows] for i in indices], head)
                terms = checkpoint(self._piece_terms, *args, use_reentrant=False, preserve_rng_state=False) \
                    if torch.is_grad_enabled() else self._piece_terms(*args)
                total = total + terms / s_out.shape[:2].numel()  # each pair's mean over the view's images and tokens
            pairs += len(partners)
        return total / pairs

    def _pieces(self, x: torch.Tensor) -> list[slice]:
        """Even slices of the images of ``x`` (B, N, ...) whose K-wide tensors have at most ``piece_elements``
        elements, at least one image each."""
        batch, tokens = x.shape[:2]
        n = min(batch, math.ceil(batch * tokens * self.center.shape[-1] / self.piece_elements))
        return [slice(batch * i // n, batch * (i + 1) // n) for i in range(n)]

    @torch.no_grad()
    def targets(self, teacher_proj: list[torch.Tensor], teacher_temp: float) -> list[torch.Tensor]:
        """The teacher's centred, sharpened distributions (``teacher_targets``) of every view (B, M, K), in its
        logits' dtype, made piece by piece so that their fp32 temporaries stay piece-sized."""
        out = []
        for logits in teacher_proj:
            out.append(torch.empty_like(logits))
            for rows in self._pieces(logits):
                out[-1][rows] = teacher_targets(logits[rows], self.center, teacher_temp)
        return out

    def _piece_terms(self, student_out: torch.Tensor, targets: list[torch.Tensor], indices: list[torch.Tensor],
                     head: nn.Module | None) -> torch.Tensor:
        """Some images of one student view: the matched cross-entropies summed over their tokens and the view's
        pairs, in fp32 at least (a bf16 sum over thousands of tokens would lose digits); the K-wide tensors live
        only in here."""
        log_probs = student_log_probs(student_out if head is None else head(student_out), self.student_temp)
        total = 0.0
        for q, index in zip(targets, indices):
            # Under autocast the matmul runs in the autocast dtype whatever its inputs: no K-wide fp32 copy of q.
            if not torch.is_autocast_enabled(q.device.type):
                q = q.to(log_probs.dtype)
            # -sum_k q[b, index[b, n], k] logp[b, n, k] for every student token, without gathering a (B, N_v, K)
            # copy of the targets: cross entropies against every teacher token (B, N_v, M), then the matched one.
            cross = torch.bmm(log_probs, q.transpose(1, 2))
            matched = cross.gather(2, index.unsqueeze(-1))
            total = total - matched.sum(dtype=torch.promote_types(matched.dtype, torch.float32))
        return total

    @torch.no_grad()
    def update_center(self, teacher_proj: list[torch.Tensor]) -> None:
        """EMA of the rows of ``teacher_proj``, (B, M, K) per view, or per view its (1, K) mean over images and
        tokens (the views have equal sizes, and every process the same batch: the mean of the means is the mean)."""
        ema_center(self.center, teacher_proj, self.center_momentum)


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
