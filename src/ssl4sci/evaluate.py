"""Frozen-embedding evaluation protocols: prototype, weighted k-NN, linear probe.

Each protocol reads one ``embeddings/{method}.parquet`` file, fits on the
``fit_splits`` rows, scores the ``score_split`` rows and writes one JSON file.
The biology protocols ``prototype_seed`` and ``simpleshot`` (``BIO_PROTOCOLS``,
implemented in :mod:`ssl4sci.fewshot`) instead re-split a pool of rows with a
seeded, protocol-defined split.  ``spectrum`` (``LABEL_FREE_PROTOCOLS``) reads no
labels: it measures the effective rank and the top principal components' variance
share of the ``fit_splits`` embeddings (dimensional collapse, :mod:`ssl4sci.spectrum`).
Every other protocol can be run at a taxonomic rank
(``rank="genus"``...): the class label is then that column of the embeddings
file instead of ``label``; rows whose label is null or empty are excluded and
counted (``n_null_label``).

The two similarity-based protocols never materialise a full
queries x keys similarity matrix: they sweep query chunks and, inside each,
key chunks (class prototypes or training items), keeping a running top-k per
query.  Peak extra memory is therefore about ``chunk_size**2`` floats whatever
the number of queries, classes or training items.

Ties in similarity (e.g. duplicated embeddings) are broken deterministically in
favour of the lower key index, so chunked and unchunked sweeps select the same
neighbours.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .io import write_json
from .spectrum import spectrum_summary
# The embedding reader is shared with the label-efficiency stage.
from .probes import EMBEDDING_COLUMN, load_embeddings  # noqa: F401

PROTOCOLS = ("prototype", "knn", "linear")  # the lensing default set, unchanged
BIO_PROTOCOLS = ("prototype_seed", "simpleshot")  # protocol-defined splits, see ssl4sci.fewshot
LABEL_FREE_PROTOCOLS = ("spectrum",)  # no labels: one result per method, never repeated per taxonomic rank
ALL_PROTOCOLS = PROTOCOLS + BIO_PROTOCOLS + LABEL_FREE_PROTOCOLS
# taxonomic ranks that may replace the 'label' column (the column of that name must exist)
RANKS = ("kingdom", "phylum", "class", "order", "family", "genus", "species")

DEFAULTS: dict[str, Any] = {
    "knn_k": 20,
    "knn_temperature": 0.07,
    "topk": [1, 3, 5],
    "linear_max_iter": 1000,
    "linear_C": 1.0,
    "chunk_size": 4096,
    "fit_splits": ["train"],
    "score_split": "test",
    "seed": 0,
    # --- biology protocols and ranks (see ssl4sci.fewshot)
    "rank": None,  # None: the 'label' column; else one of RANKS
    "pool_splits": None,  # manifest splits re-split by the bio protocols; None = [score_split]
    "proto_split_fraction": 0.5,  # prototype_seed: fraction of each class's pool rows building its prototype
    "min_count": 2,  # bio protocols: classes with fewer pool images (count < min_count) are excluded
    "shots": [1, 5],  # simpleshot: support images per class
    "nfold": 5,  # simpleshot: seeded resamplings of the support sets
}

# --------------------------------------------------------------------------- chunked top-k
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


# --------------------------------------------------------------------------- protocols
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


# --------------------------------------------------------------------------- orchestration
def _fail(path: Path, msg: str) -> ValueError:
    return ValueError(f"{path}: {msg}")


def label_column(df: pd.DataFrame, rank: str | None, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The class label of every row: ``label`` (``rank`` None) or the ``rank`` column.

    Returns ``(labels as str object array, valid mask)``; null and empty/blank labels are invalid
    (their entry in ``labels`` is ``""``).
    """
    column = "label" if rank is None else rank
    if column not in df.columns:
        what = "a 'label' column" if rank is None else f"a {rank!r} column for rank={rank!r}"
        raise _fail(path, f"expected {what}, found columns {list(df.columns)}")
    values = df[column]
    present = values.notna()
    text = values.astype(object).where(present, "").astype(str)
    valid = (present & (text.str.strip() != "")).to_numpy()
    return text.to_numpy(dtype=object), valid


def _class_table(
    labels: np.ndarray, label_ids: pd.Series | None, fit_mask: np.ndarray, valid: np.ndarray, path: Path
) -> list[str]:
    """Class names of the fit rows, ordered by ``label_id`` when given (else by name)."""
    if label_ids is not None:
        pairs = pd.DataFrame({"label": labels[valid], "label_id": label_ids.to_numpy()[valid]})
        per_id = pairs.groupby("label_id")["label"].nunique()
        per_label = pairs.groupby("label")["label_id"].nunique()
        if (per_id > 1).any() or (per_label > 1).any():
            raise _fail(path, "expected a one-to-one mapping between 'label' and 'label_id'")
        fit_pairs = pairs[fit_mask[valid]].drop_duplicates().sort_values("label_id")
        return fit_pairs["label"].tolist()
    return sorted(pd.unique(labels[fit_mask & valid]).tolist())


def _per_class_accuracy(correct: np.ndarray, y: np.ndarray, classes: list[str]) -> dict[str, float]:
    """Top-1 accuracy of each class present among the scored rows (O(rows + classes))."""
    n = len(classes)
    total = np.bincount(y, minlength=n)
    hits = np.bincount(y, weights=np.asarray(correct, dtype=np.float64), minlength=n)
    return {classes[i]: float(hits[i] / total[i]) for i in np.flatnonzero(total)}


def _topk_list(cfg: dict, path: Path) -> list[int]:
    ks = cfg["topk"]
    ks = [ks] if isinstance(ks, int) else list(ks)
    if not ks or any(int(k) < 1 for k in ks):
        raise _fail(path, f"expected evaluate.topk to be positive integers, got {cfg['topk']}")
    return sorted({int(k) for k in ks})


def _linear_probe(
    x_fit: np.ndarray, y_fit: np.ndarray, x_score: np.ndarray, y_score: np.ndarray, classes: list[str], cfg: dict, path: Path
) -> tuple[dict, np.ndarray, dict]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    n_classes = len(classes)
    if n_classes < 2:
        raise _fail(path, f"linear probe expects at least 2 classes in the fit splits, found {n_classes}")
    scaler = StandardScaler().fit(x_fit)
    clf = LogisticRegression(C=float(cfg["linear_C"]), max_iter=int(cfg["linear_max_iter"]), random_state=int(cfg["seed"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(scaler.transform(x_fit), y_fit)
    converged = True
    for w in caught:
        if issubclass(w.category, ConvergenceWarning):
            converged = False
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    proba = clf.predict_proba(scaler.transform(x_score))  # columns = clf.classes_ = 0..C-1
    pred = proba.argmax(axis=1)
    correct = pred == y_score

    auc_per_class: dict[str, float] = {}
    for i, name in enumerate(classes):
        pos = y_score == i
        if pos.any() and not pos.all():
            auc_per_class[name] = float(roc_auc_score(pos, proba[:, i]))
    present = np.unique(y_score)
    if n_classes > 2 and len(present) == n_classes:
        macro = float(roc_auc_score(y_score, proba, multi_class="ovr", average="macro", labels=np.arange(n_classes)))
    elif auc_per_class:
        # binary task, or a fit class missing from the score split: mean of the defined one-vs-rest AUCs
        macro = float(np.mean(list(auc_per_class.values())))
    else:
        macro = None  # a single class in the score split: AUC undefined
    metrics = {
        "accuracy": float(correct.mean()),
        "macro_auc": macro,
        "auc_per_class": auc_per_class,
    }
    info = {"converged": bool(converged), "n_iter": int(np.max(clf.n_iter_))}
    return metrics, correct, info


def _names(classes: list[str], most: int = 5) -> str:
    return ", ".join(repr(c) for c in classes[:most]) + (", ..." if len(classes) > most else "")


def _coverage_warnings(classes: list[str], y_score: np.ndarray, excluded: list[str], n_excluded: int, metrics: dict,
                       fit_splits: list[str], score_split: str) -> list[str]:
    """What the metrics leave out: classes only in the score split, fit classes the score split lacks."""
    found = []
    if excluded:
        found.append(f"{n_excluded} {score_split!r} rows of {len(excluded)} class(es) absent from fit_splits "
                     f"{fit_splits} are not scored: {_names(excluded)}")
    absent = [c for i, c in enumerate(classes) if not (y_score == i).any()]
    if absent:
        found.append(f"{len(absent)} of {len(classes)} fit classes have no {score_split!r} rows, the metrics cover "
                     f"the others: {_names(absent)}")
    if "macro_auc" in metrics and metrics["macro_auc"] is None:
        found.append(f"macro_auc is null: the {score_split!r} rows hold one class only")
    return found


def _resolve_rank(rank: str | None, c: dict, path: Path) -> str | None:
    rank = c.get("rank") if rank is None else rank
    if rank is None or rank == "label":
        return None
    if rank not in RANKS:
        raise _fail(path, f"unknown rank {rank!r}, expected one of {', '.join(RANKS)} (or null for the 'label' column)")
    return str(rank)


def evaluate(
    embeddings_path: str | os.PathLike,
    protocol: str,
    cfg: dict,
    out_path: str | os.PathLike,
    rank: str | None = None,
) -> dict:
    """Run one protocol on one embedding file, write JSON to ``out_path`` atomically, return it.

    ``protocol``: one of ``PROTOCOLS`` (fit/score on the manifest's splits), ``BIO_PROTOCOLS``
    (seeded re-split of the ``pool_splits`` rows, see :mod:`ssl4sci.fewshot`) or ``spectrum`` (no labels).
    ``rank``: a taxonomic rank column (``RANKS``) used as the class label instead of ``label``;
    ``None`` falls back to ``cfg["rank"]`` and then to ``label`` (the lensing behaviour).
    """
    path = Path(embeddings_path)
    if protocol not in ALL_PROTOCOLS:
        raise _fail(path, f"unknown protocol {protocol!r}, expected one of {', '.join(ALL_PROTOCOLS)}")
    cfg_in = dict(cfg or {})
    c = {**DEFAULTS, **cfg_in}
    chunk = int(c["chunk_size"])
    if chunk < 1:
        raise _fail(path, f"expected evaluate.chunk_size >= 1, got {chunk}")
    rank = _resolve_rank(rank, c, path)
    if rank is not None and protocol in LABEL_FREE_PROTOCOLS:
        raise _fail(path, f"protocol {protocol!r} uses no labels, expected no taxonomic rank (got {rank!r})")

    df, emb, meta = load_embeddings(path)
    if not all(np.isfinite(emb[a : a + 65536]).all() for a in range(0, len(emb), 65536)):
        raise _fail(path, "expected finite embeddings, found NaN or inf")
    if "split" not in df.columns:
        raise _fail(path, "expected a 'split' column")
    split = df["split"].astype(str).to_numpy()
    if protocol in LABEL_FREE_PROTOCOLS:
        labels = valid = label_ids = None
    else:
        labels, valid = label_column(df, rank, path)
        label_ids = df["label_id"] if rank is None and "label_id" in df.columns else None

    if protocol in LABEL_FREE_PROTOCOLS:
        part = _evaluate_spectrum(emb, split, c, path)
    elif protocol in BIO_PROTOCOLS:
        from .fewshot import evaluate_bio

        part = evaluate_bio(protocol, emb, labels, valid, label_ids, split, df.get("id"), c, path)
    else:
        part = _evaluate_fit_score(protocol, emb, labels, valid, label_ids, split, c, path)

    result = {
        "method": meta.get("method", path.stem),
        "protocol": protocol,
        "rank": rank,
        **part,
        "embed_dim": int(emb.shape[1]),
        "config": cfg_in,
        "embeddings": {
            "path": str(path),
            "checkpoint_sha256": meta.get("checkpoint_sha256"),
            "model": meta.get("model"),
        },
    }
    write_json(out_path, result)
    return result


def _fit_splits(c: dict, path: Path) -> list[str]:
    fit_splits = [c["fit_splits"]] if isinstance(c["fit_splits"], str) else [str(v) for v in c["fit_splits"]]
    if not fit_splits:
        raise _fail(path, "expected evaluate.fit_splits to name at least one split")
    return fit_splits


def _evaluate_spectrum(emb: np.ndarray, split: np.ndarray, c: dict, path: Path) -> dict:
    """``spectrum``: effective rank (RankMe) and PC1 / PC1+PC2 variance shares of the ``fit_splits`` rows."""
    fit_splits = _fit_splits(c, path)
    fit_mask = np.isin(split, fit_splits)
    if not fit_mask.any():
        raise _fail(path, f"no rows in evaluate.fit_splits {fit_splits}, expected embeddings to measure")
    return {"metrics": spectrum_summary(emb[fit_mask]), "n_fit": int(fit_mask.sum()), "fit_splits": fit_splits}


def _evaluate_fit_score(
    protocol: str,
    emb: np.ndarray,
    labels: np.ndarray,
    valid: np.ndarray,
    label_ids: pd.Series | None,
    split: np.ndarray,
    c: dict,
    path: Path,
) -> dict:
    """The ``PROTOCOLS``: fit on ``fit_splits``, score ``score_split``."""
    chunk = int(c["chunk_size"])
    fit_splits = _fit_splits(c, path)
    score_split = str(c["score_split"])
    if score_split in fit_splits:
        raise _fail(path, f"score_split {score_split!r} must not be one of fit_splits {fit_splits}")
    for s in [*fit_splits, score_split]:
        if not (split == s).any():
            raise _fail(path, f"split {s!r} has no rows, expected rows for fit_splits={fit_splits} and score_split={score_split!r}")
    fit_mask = np.isin(split, fit_splits)
    score_mask = split == score_split
    n_null = int(((fit_mask | score_mask) & ~valid).sum())
    fit_mask &= valid
    if not fit_mask.any():
        raise _fail(path, f"every row of fit_splits {fit_splits} has a null label")
    classes = _class_table(labels, label_ids, fit_mask, valid, path)
    codes = pd.Index(classes).get_indexer(labels).astype(np.int64)  # -1: class not in the fit splits
    codes[~valid] = -1

    excluded = score_mask & valid & (codes < 0)
    score_mask &= codes >= 0
    if not score_mask.any():
        raise _fail(
            path,
            f"no {score_split!r} rows have a class present in {fit_splits}; expected test classes among {classes}",
        )
    if len(classes) < 2:  # one class: every prediction is right, a metric of 1 that means nothing
        raise _fail(path, f"{protocol} expects at least 2 classes in fit_splits {fit_splits}, found {len(classes)} "
                          f"({', '.join(map(repr, classes))})")
    y_fit, y_score = codes[fit_mask], codes[score_mask]
    x_fit, x_score = emb[fit_mask], emb[score_mask]
    n_classes = len(classes)
    fit_info: dict[str, Any] = {}

    if protocol == "prototype":
        ks = _topk_list(c, path)
        kmax = min(max(ks), n_classes)
        top = prototype_ranks(x_fit, y_fit, x_score, n_classes, kmax, chunk)
        hits = top == y_score[:, None]
        metrics = {f"top{k}": float(hits[:, : min(k, n_classes)].any(axis=1).mean()) for k in ks}
        correct = hits[:, 0]
    elif protocol == "knn":
        k = int(c["knn_k"])
        t = float(c["knn_temperature"])
        if k < 1 or not t > 0:
            raise _fail(path, f"expected knn_k >= 1 and knn_temperature > 0, got {k} and {t}")
        rank, top1 = knn_true_class_rank(x_fit, y_fit, x_score, y_score, min(k, len(y_fit)), t, chunk)
        metrics = {f"top{j}": float((rank < min(j, n_classes)).mean()) for j in (1, 5)}
        correct = top1 == y_score
        fit_info = {"k": min(k, len(y_fit)), "temperature": t}
    else:
        metrics, correct, fit_info = _linear_probe(x_fit, y_fit, x_score, y_score, classes, c, path)

    excluded_classes = sorted(set(labels[excluded].tolist()))
    return {
        "metrics": metrics,
        "per_class_accuracy": _per_class_accuracy(correct, y_score, classes),
        "warnings": _coverage_warnings(classes, y_score, excluded_classes, int(excluded.sum()), metrics, fit_splits,
                                       score_split),
        "n_fit": int(len(y_fit)),
        "n_score": int(len(y_score)),
        "n_excluded": int(excluded.sum()),
        "excluded_classes": excluded_classes,
        "n_null_label": n_null,
        "n_classes": n_classes,
        "classes": classes,
        "fit_info": fit_info,
        "fit_splits": fit_splits,
        "score_split": score_split,
    }
