"""Cosine nearest neighbours over frozen features, without a full similarity matrix: the chunked top-k kernel, class
prototypes and DINO's weighted k-NN vote.

Shared by the evaluate stage (prototype and k-NN protocols), the few-shot protocols and the pretraining monitor.
The sweeps go over query chunks and, inside each, key chunks (class prototypes or training items), keeping a running
top-k per query, so the peak extra memory is about ``chunk_size**2`` floats whatever the number of queries, classes
or training items. Ties in similarity (e.g. duplicated embeddings) go to the lower key index, so chunked and
unchunked sweeps select the same neighbours.
"""
from __future__ import annotations

import warnings

import numpy as np


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation in float32; all-zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, eps)


def _as_tensor(x: np.ndarray):
    """Zero-copy float32 CPU tensor; arrays read from Arrow may be read-only (never written here)."""
    import torch

    arr = np.ascontiguousarray(x, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*", category=UserWarning)
        return torch.from_numpy(arr)


def _stable_order(vals, idx):
    """Reorder each row by (value descending, index ascending)."""
    import torch

    order = torch.argsort(idx, dim=1)
    vals, idx = torch.gather(vals, 1, order), torch.gather(idx, 1, order)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    return torch.gather(vals, 1, order), torch.gather(idx, 1, order)


def _block_topk(sims, k: int):
    """Top-k of each row of a 2-d tensor with ties broken towards the lower column."""
    import torch

    n = sims.shape[1]
    vals, idx = torch.topk(sims, min(k + 1, n), dim=1, largest=True, sorted=True)
    if n > k:
        # torch.topk picks arbitrarily among values tied with the k-th one; such a tie shows
        # as (k+1)-th value == k-th value.  Re-select those (rare) rows with a stable sort.
        tie_rows = torch.nonzero(vals[:, k] == vals[:, k - 1]).flatten()
        vals, idx = vals[:, :k], idx[:, :k]
        for a in range(0, tie_rows.numel(), 256):  # bounded memory even if every row ties
            rows = tie_rows[a : a + 256]
            sv, si = torch.sort(sims[rows], dim=1, descending=True, stable=True)
            vals[rows] = sv[:, :k]
            idx[rows] = si[:, :k]
    return _stable_order(vals, idx)


def chunked_topk_cosine(
    queries: np.ndarray, keys: np.ndarray, k: int, chunk_size: int = 4096, normalize: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k keys by cosine similarity for every query, sweeping query and key chunks.

    ``queries`` (Q, D) and ``keys`` (K, D) are L2-normalised chunk by chunk when
    ``normalize`` (no normalised copy of the inputs is made), otherwise used as given
    (plain dot product).  Returns ``(values float32 (Q, k), indices int64 (Q, k))``
    sorted by decreasing similarity, ties towards the lower key index.  Never holds
    more than ``chunk_size x chunk_size`` similarities at once.
    """
    import torch

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    q_all = _as_tensor(queries)
    k_all = _as_tensor(keys)
    n_q, n_k = q_all.shape[0], k_all.shape[0]
    k = min(int(k), n_k)
    if k < 1:
        raise ValueError("need at least one key and k >= 1")
    prep = (lambda t: torch.nn.functional.normalize(t, dim=1, eps=1e-12)) if normalize else (lambda t: t)
    out_v = np.empty((n_q, k), dtype=np.float32)
    out_i = np.empty((n_q, k), dtype=np.int64)
    with torch.no_grad():
        for q0 in range(0, n_q, chunk_size):
            q = prep(q_all[q0 : q0 + chunk_size])
            run_v = torch.full((q.shape[0], k), -torch.inf, dtype=torch.float32)
            run_i = torch.full((q.shape[0], k), -1, dtype=torch.int64)
            for k0 in range(0, n_k, chunk_size):
                block = q @ prep(k_all[k0 : k0 + chunk_size]).T
                bv, bi = _block_topk(block, min(k, block.shape[1]))
                del block
                cv, ci = _stable_order(torch.cat([run_v, bv], dim=1), torch.cat([run_i, bi + k0], dim=1))
                run_v, run_i = cv[:, :k].contiguous(), ci[:, :k].contiguous()
            out_v[q0 : q0 + q.shape[0]] = run_v.numpy()
            out_i[q0 : q0 + q.shape[0]] = run_i.numpy()
    return out_v, out_i


# --------------------------------------------------------------------------- class prototypes, k-NN votes
def class_prototypes(x: np.ndarray, y: np.ndarray, n_classes: int, chunk_size: int = 4096) -> np.ndarray:
    """Re-normalised mean of the L2-normalised embeddings of each class, (n_classes, D) float32.

    Accumulates in float64 chunk by chunk, so no normalised copy of ``x`` is made.
    """
    import torch

    x_t = _as_tensor(x)
    y_t = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    sums = torch.zeros((n_classes, x_t.shape[1]), dtype=torch.float64)
    for a in range(0, x_t.shape[0], chunk_size):
        xn = torch.nn.functional.normalize(x_t[a : a + chunk_size].double(), dim=1, eps=1e-12)
        sums.index_add_(0, y_t[a : a + chunk_size], xn)
    # the mean's direction is the sum's direction: normalising the sum re-normalises the mean
    sums /= torch.linalg.vector_norm(sums, dim=1, keepdim=True).clamp_min_(1e-12)
    return sums.float().numpy()


def prototype_ranks(
    x_fit: np.ndarray, y_fit: np.ndarray, x_score: np.ndarray, n_classes: int, kmax: int, chunk_size: int
) -> np.ndarray:
    """Top-``kmax`` predicted class indices (Q, kmax) by cosine similarity to prototypes."""
    protos = class_prototypes(x_fit, y_fit, n_classes, chunk_size)
    _, idx = chunked_topk_cosine(x_score, protos, kmax, chunk_size)
    return idx


def knn_true_class_rank(
    x_fit: np.ndarray,
    y_fit: np.ndarray,
    x_score: np.ndarray,
    y_score: np.ndarray,
    k: int,
    temperature: float,
    chunk_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted k-NN voting (Caron et al. 2021, DINO).

    Each of the k most cosine-similar training items votes for its class with
    weight ``exp(sim / T)``.  Classes are ranked by summed votes (ties, including
    classes with no vote, towards the lower class index).  Returns
    ``(rank of the true class (Q,), top-1 predicted class (Q,))``; the true class is
    in the top-j predictions iff ``rank < j``.  Only the k neighbours' labels are
    touched, so memory does not grow with the number of classes.
    """
    n_q = len(y_score)
    ranks = np.empty(n_q, dtype=np.int64)
    top1 = np.empty(n_q, dtype=np.int64)
    for q0 in range(0, n_q, chunk_size):  # vote per query chunk: only ranks are kept for all queries
        sims, nb = chunked_topk_cosine(x_score[q0 : q0 + chunk_size], x_fit, k, chunk_size)
        lab = y_fit[nb]  # (q, k)
        # exp((s - s_max) / T) ranks classes exactly like exp(s / T) but cannot overflow
        s64 = sims.astype(np.float64)
        w = np.exp((s64 - s64[:, :1]) / float(temperature))
        step = max(1, (1 << 22) // (lab.shape[1] ** 2))  # bounds the (rows, k, k) vote tensors to ~32 MB
        for a in range(0, len(lab), step):
            sl = slice(q0 + a, q0 + min(a + step, len(lab)))
            ranks[sl], top1[sl] = _rank_votes(lab[a : a + step], w[a : a + step], y_score[sl])
    return ranks, top1


def _rank_votes(lab: np.ndarray, w: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rank of the true class ``y``, top-1 class) of each row from its neighbours' labels ``lab`` and vote
    weights ``w`` (both (Q, k)), without a (Q, classes) table."""
    kk = lab.shape[1]
    same = lab[:, :, None] == lab[:, None, :]  # (Q, k, k)
    score = (same * w[:, None, :]).sum(axis=2)  # summed vote of each neighbour's class
    earlier = np.tril(np.ones((kk, kk), dtype=bool), k=-1)
    first = ~(same & earlier[None]).any(axis=2)  # first occurrence of each distinct class
    is_true = lab == y[:, None]
    # the true class's summed vote, taken from the same sums (exact float equality)
    s_true = np.where(is_true, score, 0.0).max(axis=1)
    has_true = is_true.any(axis=1)
    s_true = np.where(has_true, s_true, 0.0)
    higher = (first & (score > s_true[:, None])).sum(axis=1)
    lower_idx = lab < y[:, None]
    tied_pos = (first & lower_idx & (score == s_true[:, None]) & ~is_true).sum(axis=1)
    # true class without votes: every vote-less class with a lower index is ahead
    positive_lower = (first & lower_idx & (score > 0)).sum(axis=1)
    tied_zero = y - positive_lower
    rank = higher + np.where(s_true > 0, tied_pos, tied_zero)
    # top-1: max score, ties to the lower class index
    key = np.where(first, score, -np.inf)
    best = key.max(axis=1, keepdims=True)
    cand = np.where(first & (key == best), lab, np.iinfo(np.int64).max)
    return rank, cand.min(axis=1)
