"""The spectrum of a set of feature vectors: effective rank (RankMe) and the variance share of the top components.

Dimensional collapse (the features living in a few directions of their space) does not show in a self-distillation
head's output distribution: the head can spread its prototypes evenly while the backbone feeds it features that
vary along a handful of directions. The singular values of the centred features show it directly.

Both measures centre the features first, so they describe how the images differ from each other, not where the
cloud sits; they are invariant to a constant offset and to a global scale. Neutral module: the pretraining monitor
and the evaluate stage both use it.
"""
from __future__ import annotations

import numpy as np

_CHUNK_ROWS = 65536  # rows per float64 block: bounded extra memory whatever the number of features


def _as_matrix(features) -> np.ndarray:
    x = np.asarray(features.detach().float().cpu() if hasattr(features, "detach") else features)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"expected a non-empty (n, dim) feature matrix, got shape {x.shape}")
    return x


def centred_eigenvalues(features) -> np.ndarray:
    """Eigenvalues of the centred features' scatter matrix (the squared singular values), descending, in float64.

    Two passes over row blocks (the mean, then the scatter of the centred rows) instead of an SVD of the whole
    matrix: memory stays at dim x dim however many rows there are, and exact centring keeps precision when the
    offset is large compared with the spread.
    """
    x = _as_matrix(features)
    mean = np.zeros(x.shape[1], dtype=np.float64)
    largest = 0.0
    for a in range(0, len(x), _CHUNK_ROWS):
        block = x[a : a + _CHUNK_ROWS].astype(np.float64)
        mean += block.sum(axis=0)
        largest = max(largest, float(np.abs(block).max()))
    mean /= len(x)
    scatter = np.zeros((x.shape[1], x.shape[1]), dtype=np.float64)
    for a in range(0, len(x), _CHUNK_ROWS):
        block = x[a : a + _CHUNK_ROWS].astype(np.float64) - mean
        scatter += block.T @ block
    if not np.isfinite(scatter).all():
        raise ValueError("expected finite features, found NaN or inf")
    eigenvalues = np.linalg.eigvalsh(scatter)[::-1]
    # Rounding leaves values of about eps x the largest eigenvalue where the true value is 0 (a rank-deficient
    # cloud, as in numpy's matrix_rank), and of about n (eps x |x|)^2 from centring (identical rows): both are 0.
    eps, n, dim = np.finfo(np.float64).eps, len(x), x.shape[1]
    tolerance = dim * max(eigenvalues[0] * eps, n * (4 * eps * largest) ** 2)
    return np.where(eigenvalues > tolerance, eigenvalues, 0.0)


def _effective_rank(eigenvalues: np.ndarray, eps: float) -> float:
    singular = np.sqrt(eigenvalues)
    total = singular.sum()
    if total <= 0:
        return 0.0
    p = singular / total + eps
    return float(np.exp(-np.sum(p * np.log(p))))


def _variance_shares(eigenvalues: np.ndarray, k: int) -> np.ndarray:
    if k < 1:
        raise ValueError(f"expected k >= 1 principal components, got {k}")
    total = eigenvalues.sum()
    if total <= 0:
        return np.full(min(k, len(eigenvalues)), np.nan)
    return np.cumsum(eigenvalues[:k]) / total


def effective_rank(features, eps: float = 1e-12) -> float:
    """RankMe (Garrido et al. 2023): exp of the entropy of the L1-normalised singular values of the centred features.

    Between 1 (all variance along one direction) and min(n - 1, dim) (equal variance in every direction);
    0.0 when the features do not vary at all.
    """
    return _effective_rank(centred_eigenvalues(features), eps)


def variance_shares(features, k: int) -> np.ndarray:
    """Cumulative share of the variance in the first ``k`` principal components (at most dim values).

    ``variance_shares(x, 2)[1]`` is the share of PC1 and PC2 together; NaN when the features do not vary.
    """
    return _variance_shares(centred_eigenvalues(features), k)


def spectrum_summary(features, eps: float = 1e-12) -> dict[str, float | int | None]:
    """Effective rank, its share of the dimension, and the variance shares of PC1 and PC1+PC2, with n and dim."""
    x = _as_matrix(features)
    eigenvalues = centred_eigenvalues(x)
    rank, shares, dim = _effective_rank(eigenvalues, eps), _variance_shares(eigenvalues, 2), int(x.shape[1])

    def share(i: int) -> float | None:  # JSON has no NaN: a share that does not exist is null
        return float(shares[i]) if i < len(shares) and np.isfinite(shares[i]) else None

    return {"effective_rank": rank, "embed_dim": dim, "effective_rank_ratio": rank / dim,
            "pc1_share": share(0), "pc2_share": share(1), "n": int(x.shape[0])}
