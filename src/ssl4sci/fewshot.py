"""Biology evaluation protocols on frozen embeddings: ``prototype_seed`` and ``simpleshot``.

Both protocols ignore the manifest's train/val/test roles *inside* the evaluated
rows: they take a **pool** of rows (the manifest splits listed in
``evaluate.pool_splits``, by default only the ``score_split``, so that no image
seen during self-supervised pre-training is scored) and re-split it with a
seeded, per-class (stratified) rule.  The label is the ``label`` column or, with
``rank``, a taxonomic rank column (rows with a null/empty label are excluded and
counted in ``n_null_label``).

Seeded splits
    Every row gets a 64-bit key ``splitmix64(hash(id) ^ salt(seed, stream))``:
    the rows of a class are ordered by key and the first ones form the
    prototype / support set.  Keys depend on the row's ``id`` (row position when
    the file has no ``id`` column), not on the row order, so every method's
    embedding file gets exactly the same split: comparisons between methods are
    paired.  Same seed -> same split; another seed -> an independent split.

``prototype_seed`` (the fixed "seed protocol", as in the VLM4Bio evaluation)
    * classes with **fewer than** ``min_count`` pool images (``count < min_count``)
      are excluded and reported (``excluded_classes``, ``n_excluded`` rows); a class
      with exactly ``min_count`` images is kept.  ``min_count >= 2``.
    * in every kept class of ``n`` images, ``n_proto = clip(floor(proto_split_fraction * n), 1, n - 1)``
      rows (the lowest keys) build the prototype, the other ``n - n_proto`` are scored;
    * prototype = re-normalised mean of the L2-normalised embeddings; queries are
      ranked against prototypes by cosine similarity (ties to the lower class index);
      metrics ``top{k}`` for every k of ``evaluate.topk`` (k clipped to the number of classes).

``simpleshot`` (SimpleShot, Wang et al. 2019, CL2N variant; the BioCLIP few-shot protocol)
    * classes with fewer than ``max(min_count, max(shots) + 1)`` pool images are excluded,
      the same classes for every shot so that the 1- and 5-shot numbers are comparable;
    * for each of ``nfold`` folds (keys seeded by ``(seed, fold)``) and each shot ``s``:
      the ``s`` lowest-key rows of each class are the support set (nested: the 1-shot
      support is part of the 5-shot support of the same fold), all other rows of the
      kept classes are queries;
    * features: L2-normalise the embedding, subtract the mean of the (L2-normalised)
      support features, L2-normalise again (CL2N);
    * each class's centroid is the mean of its CL2N support features (not re-normalised);
      a query is assigned to the centroid at the smallest Euclidean distance (ties to the
      lower class index);
    * metrics ``shot{s}_mean`` / ``shot{s}_std``: mean and sample standard deviation
      (ddof=1; null when ``nfold == 1``) of the per-fold accuracies.

Scaling: nothing here holds a queries x classes (let alone queries x classes x dim)
array.  Features are gathered chunk by chunk from the embedding matrix (no copy of the
pool), class tables are (classes x dim) and scoring goes through
:func:`ssl4sci.knn.chunked_topk_cosine`, so the peak extra memory is about
``chunk_size**2`` floats + the class table + O(rows) integers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

from .knn import chunked_topk_cosine
from .scoring import file_error, per_class_accuracy, sorted_ints, topk_list

_M64 = (1 << 64) - 1
_ID_HASH_KEY = "ssl4sci-split-v1"  # 16 bytes, as pandas' hash_array requires
STREAM_PROTOTYPE_SEED = 0
STREAM_SIMPLESHOT = 1 << 32  # + fold


# --------------------------------------------------------------------------- seeded keys
def _splitmix64_int(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Vectorised splitmix64 finaliser on uint64 (wrap-around arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def id_hashes(ids: Any, n: int | None = None) -> np.ndarray:
    """A uint64 hash of each row's id (as text); row positions ``0..n-1`` when ``ids`` is None."""
    if ids is None:
        if n is None:
            raise ValueError("id_hashes needs ids or n")
        return _splitmix64(np.arange(n, dtype=np.uint64))
    text = pd.Series(ids).astype(str).to_numpy(dtype=object)
    return pd.util.hash_array(text, encoding="utf8", hash_key=_ID_HASH_KEY, categorize=False).astype(np.uint64)


def row_keys(hashes: np.ndarray, seed: int, stream: int = 0) -> np.ndarray:
    """Seeded pseudo-random uint64 key of every row from its id hash (independent of row order)."""
    salt = _splitmix64_int(_splitmix64_int(int(seed) & _M64) ^ (int(stream) & _M64))
    return _splitmix64(np.asarray(hashes, dtype=np.uint64) ^ np.uint64(salt))


def rank_within_class(codes: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Position (0, 1, ...) of each row among the rows of its class ordered by (key, row index)."""
    codes = np.asarray(codes, dtype=np.int64)
    n = len(codes)
    order = np.lexsort((keys, codes))  # stable: equal keys keep the row order
    sorted_codes = codes[order]
    first = np.searchsorted(sorted_codes, sorted_codes, side="left")
    out = np.empty(n, dtype=np.int64)
    out[order] = np.arange(n, dtype=np.int64) - first
    return out


def n_prototype_rows(counts: np.ndarray, fraction: float) -> np.ndarray:
    """Prototype rows per class: ``clip(floor(fraction * n), 1, n - 1)`` (every class keeps a query)."""
    counts = np.asarray(counts, dtype=np.int64)
    return np.clip(np.floor(fraction * counts).astype(np.int64), 1, np.maximum(counts - 1, 1))


def seed_split(codes: np.ndarray, keys: np.ndarray, fraction: float, n_classes: int | None = None) -> np.ndarray:
    """Stratified seeded split of ``prototype_seed``: True = prototype row, False = scored row."""
    codes = np.asarray(codes, dtype=np.int64)
    counts = np.bincount(codes, minlength=n_classes or 0)
    return rank_within_class(codes, keys) < n_prototype_rows(counts, fraction)[codes]


def support_mask(codes: np.ndarray, keys: np.ndarray, shot: int) -> np.ndarray:
    """SimpleShot support set: the ``shot`` lowest-key rows of every class (nested across shots)."""
    return rank_within_class(codes, keys) < int(shot)


# --------------------------------------------------------------------------- chunked feature passes
def _gather(emb: np.ndarray, rows: np.ndarray, chunk: int) -> Iterator[tuple[int, Any]]:
    """(start, float64 tensor of emb[rows[start:start+chunk]]): one chunk of rows at a time."""
    import torch

    for a in range(0, len(rows), chunk):
        block = emb[rows[a : a + chunk]]  # float32 copy of the chunk only
        yield a, torch.from_numpy(block).to(torch.float64)


def _normalize_(t):
    """In-place row-wise L2 normalisation (all-zero rows stay zero)."""
    import torch

    return t.div_(torch.linalg.vector_norm(t, dim=1, keepdim=True).clamp_min_(1e-12))


def _features_(x, mean=None):
    """L2-normalise ``x`` in place; with ``mean``: subtract it and L2-normalise again (CL2N)."""
    _normalize_(x)
    if mean is not None:
        _normalize_(x.sub_(mean))
    return x


def cl2n(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """SimpleShot CL2N of raw embeddings: L2-normalise, subtract ``mean``, L2-normalise (float64)."""
    import torch

    t = torch.tensor(np.asarray(x, dtype=np.float64))
    return _features_(t, torch.as_tensor(np.asarray(mean, dtype=np.float64))).numpy()


def _class_sums(emb, rows, y, n_classes: int, chunk: int, mean=None) -> Any:
    """float64 (n_classes, D) per-class sums of the (CL2N when ``mean`` is given) features of ``emb[rows]``."""
    import torch

    sums = torch.zeros((n_classes, emb.shape[1]), dtype=torch.float64)
    y_t = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    for a, x in _gather(emb, rows, chunk):
        sums.index_add_(0, y_t[a : a + len(x)], _features_(x, mean))
    return sums


def chunked_argmax_dot(queries, table, chunk_size: int = 4096):
    """Index of the largest dot product ``queries @ table.T`` of each row, ties to the lower index.

    ``queries`` (Q, D) and ``table`` (K, D) float32 tensors or arrays; sweeps ``chunk_size``
    table rows at a time (``torch.max`` returns the first maximal index inside a block and a
    later block must be strictly better), so at most ``Q x chunk_size`` scores exist at once.
    A top-1 fast path of :func:`ssl4sci.knn.chunked_topk_cosine` with ``normalize=False``.
    """
    import torch

    q = torch.as_tensor(queries, dtype=torch.float32)
    t = torch.as_tensor(table, dtype=torch.float32)
    best_v = torch.full((q.shape[0],), -torch.inf, dtype=torch.float32)
    best_i = torch.zeros(q.shape[0], dtype=torch.int64)
    # one score buffer reused for every full block (no fresh chunk-sized allocation per block)
    buf = torch.empty((q.shape[0], min(chunk_size, t.shape[0])), dtype=torch.float32)
    with torch.no_grad():
        for k0 in range(0, t.shape[0], chunk_size):
            tc = t[k0 : k0 + chunk_size]
            scores = buf if tc.shape[0] == buf.shape[1] else torch.empty((q.shape[0], tc.shape[0]), dtype=torch.float32)
            torch.mm(q, tc.T, out=scores)
            v, i = scores.max(dim=1)
            better = v > best_v
            best_v = torch.where(better, v, best_v)
            best_i = torch.where(better, i + k0, best_i)
    return best_i.numpy()


def _sweep_top(emb, rows, table: np.ndarray, k: int, chunk: int, mean=None, augment: bool = False):
    """Yield (start, top-k indices into ``table``, (q, k)) for successive chunks of query ``rows``.

    Queries are the (CL2N when ``mean`` is given) features, cast to float32, with a trailing
    constant 1 when ``augment``; scores are plain dot products with ``table``; ties go to the
    lower table index.
    """
    import torch

    d = emb.shape[1]
    table_t = torch.from_numpy(np.ascontiguousarray(table, dtype=np.float32))
    for a, x in _gather(emb, rows, chunk):
        q = torch.empty((len(x), d + int(augment)), dtype=torch.float32)
        q[:, :d] = _features_(x, mean)
        del x
        if augment:
            q[:, d] = 1.0
        if k == 1:
            yield a, chunked_argmax_dot(q, table_t, chunk)[:, None]
        else:
            yield a, chunked_topk_cosine(q.numpy(), table, k, chunk, normalize=False)[1]


def prototype_table(emb: np.ndarray, rows: np.ndarray, y: np.ndarray, n_classes: int, chunk: int = 4096) -> np.ndarray:
    """Re-normalised mean of the L2-normalised ``emb[rows]`` of each class, (n_classes, D) float32."""
    return _normalize_(_class_sums(emb, rows, y, n_classes, chunk)).float().numpy()


def prototype_topk(
    emb: np.ndarray, proto_rows: np.ndarray, y_proto: np.ndarray, query_rows: np.ndarray, n_classes: int, k: int,
    chunk: int = 4096
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, top-k class indices)`` for successive chunks of ``query_rows`` (cosine to prototypes)."""
    protos = prototype_table(emb, proto_rows, y_proto, n_classes, chunk)
    yield from _sweep_top(emb, query_rows, protos, min(k, n_classes), chunk)


def simpleshot_centroids(
    emb: np.ndarray, support_rows: np.ndarray, y_support: np.ndarray, n_classes: int, chunk: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """``(support mean of the L2-normalised features (D,) float64, class centroids of the CL2N features (C, D)
    float64)``."""
    import torch

    total = torch.zeros(emb.shape[1], dtype=torch.float64)
    for _, x in _gather(emb, support_rows, chunk):
        total += _normalize_(x).sum(0)
    mean = total / max(len(support_rows), 1)
    sums = _class_sums(emb, support_rows, y_support, n_classes, chunk, mean)
    counts = torch.from_numpy(np.bincount(y_support, minlength=n_classes).astype(np.float64))
    sums /= counts.clamp_min(1.0)[:, None]
    return mean.numpy(), sums.numpy()


def simpleshot_predict(
    emb: np.ndarray, support_rows: np.ndarray, y_support: np.ndarray, query_rows: np.ndarray, n_classes: int,
    chunk: int = 4096
) -> np.ndarray:
    """Nearest-centroid class (Euclidean, CL2N features) of every query row, (Q,) int64.

    ``argmin_c ||q - m_c||^2 = argmax_c (q . m_c - ||m_c||^2 / 2)``: the queries are
    augmented with a constant 1 and the centroids with ``-||m_c||^2 / 2``, so the chunked
    dot-product top-1 sweep does the nearest-centroid search without a (Q, C) matrix.
    """
    import torch

    mean, centroids = simpleshot_centroids(emb, support_rows, y_support, n_classes, chunk)
    d = emb.shape[1]
    table = np.empty((n_classes, d + 1), dtype=np.float32)
    table[:, :d] = centroids
    table[:, d] = -0.5 * np.einsum("ij,ij->i", centroids, centroids)
    del centroids
    pred = np.empty(len(query_rows), dtype=np.int64)
    for a, idx in _sweep_top(emb, query_rows, table, 1, chunk, mean=torch.from_numpy(mean), augment=True):
        pred[a : a + len(idx)] = idx[:, 0]
    return pred


# --------------------------------------------------------------------------- orchestration
def _pool_codes(labels, valid, label_ids, split, c: dict, path: Path):
    """Pool rows, their class codes, class names (ordered by label_id when given, else by name)."""
    pool_splits = c["pool_splits"]
    if pool_splits is None:
        pool_splits = [str(c["score_split"])]
    elif isinstance(pool_splits, str):
        pool_splits = [pool_splits]
    pool_splits = [str(s) for s in pool_splits]
    if not pool_splits:
        raise file_error(path, "expected evaluate.pool_splits to name at least one split (or null for [score_split])")
    for s in pool_splits:
        if not (split == s).any():
            raise file_error(path, f"split {s!r} has no rows, expected rows for pool_splits={pool_splits}")
    in_pool = np.isin(split, pool_splits)
    n_null = int((in_pool & ~valid).sum())
    rows = np.flatnonzero(in_pool & valid)
    if len(rows) == 0:
        raise file_error(path, f"every row of pool_splits {pool_splits} has a null label")
    if label_ids is not None:
        ids = label_ids.to_numpy()[rows]
        pairs = pd.DataFrame({"label": labels[rows], "label_id": ids}).drop_duplicates()
        if pairs["label"].duplicated().any() or pairs["label_id"].duplicated().any():
            raise file_error(path, "expected a one-to-one mapping between 'label' and 'label_id'")
        names = pairs.sort_values("label_id")["label"].tolist()
        codes = pd.Index(names).get_indexer(labels[rows]).astype(np.int64)
    else:
        codes, uniques = pd.factorize(labels[rows], sort=True)
        codes, names = codes.astype(np.int64), [str(u) for u in uniques]
    return rows, codes, names, pool_splits, n_null


def _keep_classes(rows, codes, names, min_images: int, path: Path, what: str):
    """Drop classes with fewer than ``min_images`` pool rows; recode the kept ones 0..C-1 in order."""
    counts = np.bincount(codes, minlength=len(names))
    keep = counts >= min_images
    excluded = [names[i] for i in np.flatnonzero(~keep)]
    n_excluded = int(counts[~keep].sum())
    if keep.sum() < 2:
        raise file_error(
            path,
            f"{what}: {int(keep.sum())} class(es) have at least {min_images} images in the pool "
            f"({len(names)} classes, {len(rows)} rows); need at least 2 (lower evaluate.min_count / shots, or widen "
            "pool_splits)",
        )
    new_code = np.cumsum(keep) - 1
    row_keep = keep[codes]
    kept_names = [names[i] for i in np.flatnonzero(keep)]
    return rows[row_keep], new_code[codes[row_keep]].astype(np.int64), kept_names, sorted(excluded), n_excluded


def _prototype_seed_settings(c: dict, min_count: int) -> dict[str, Any]:
    """``prototype_seed``'s settings: the top-k list and the prototype fraction; a class needs ``min_count``
    pool images."""
    return {"ks": topk_list(c), "fraction": float(c["proto_split_fraction"]), "min_images": min_count}


def _simpleshot_settings(c: dict, min_count: int) -> dict[str, Any]:
    """``simpleshot``'s settings: the shots and the number of folds; a class needs a query beyond its
    largest support set."""
    shots = sorted_ints(c["shots"])
    return {"shots": shots, "nfold": int(c["nfold"]), "min_images": max(min_count, max(shots) + 1)}


def _run_prototype_seed(emb: np.ndarray, rows: np.ndarray, codes: np.ndarray, classes: list[str],
                        hashes: np.ndarray, settings: dict[str, Any]) -> dict[str, Any]:
    """Prototypes from each class's lowest-key rows, top-k accuracies of the other rows."""
    seed, frac, ks = settings["seed"], settings["fraction"], settings["ks"]
    n_classes = len(classes)
    proto = seed_split(codes, row_keys(hashes, seed, STREAM_PROTOTYPE_SEED), frac, n_classes)
    y_score = codes[~proto]
    kmax = min(max(ks), n_classes)
    hits = np.zeros(kmax, dtype=np.int64)  # hits[j]: queries whose true class is at position j
    correct = np.zeros(len(y_score), dtype=bool)
    for a, idx in prototype_topk(emb, rows[proto], codes[proto], rows[~proto], n_classes, kmax, settings["chunk"]):
        match = idx == y_score[a : a + len(idx), None]
        hits += match.sum(axis=0)
        correct[a : a + len(idx)] = match[:, 0]
    cum = np.cumsum(hits)
    metrics = {f"top{k}": float(cum[min(k, n_classes) - 1] / len(y_score)) for k in ks}
    return {
        "metrics": metrics,
        "per_class_accuracy": per_class_accuracy(correct, y_score, classes),
        "n_fit": int(proto.sum()),
        "n_score": int(len(y_score)),
        "fit_info": {"seed": seed, "proto_split_fraction": frac, "min_count": settings["min_count"]},
    }


def _simpleshot_folds(
    emb: np.ndarray, rows: np.ndarray, codes: np.ndarray, n_classes: int, hashes: np.ndarray, settings: dict[str, Any]
) -> tuple[dict[int, list[float]], dict[int, int], np.ndarray, np.ndarray]:
    """Every fold and shot: ``(accuracies per shot, queries per shot, per-class hits and query counts of the largest
    shot summed over folds)``."""
    shots = settings["shots"]
    report_shot = max(shots)
    folds: dict[int, list[float]] = {s: [] for s in shots}
    n_query: dict[int, int] = {}
    hit_c = np.zeros(n_classes, dtype=np.float64)
    tot_c = np.zeros(n_classes, dtype=np.int64)
    for fold in range(settings["nfold"]):
        rank = rank_within_class(codes, row_keys(hashes, settings["seed"], STREAM_SIMPLESHOT + fold))
        for s in shots:
            sup = rank < s
            y_q = codes[~sup]
            pred = simpleshot_predict(emb, rows[sup], codes[sup], rows[~sup], n_classes, settings["chunk"])
            ok = pred == y_q
            folds[s].append(float(ok.mean()))
            n_query[s] = int(len(y_q))
            if s == report_shot:
                hit_c += np.bincount(y_q, weights=ok.astype(np.float64), minlength=n_classes)
                tot_c += np.bincount(y_q, minlength=n_classes)
    return folds, n_query, hit_c, tot_c


def _run_simpleshot(emb: np.ndarray, rows: np.ndarray, codes: np.ndarray, classes: list[str], hashes: np.ndarray,
                    settings: dict[str, Any]) -> dict[str, Any]:
    """Nearest-centroid accuracy of every shot over seeded folds: mean and sample std per shot."""
    shots, nfold = settings["shots"], settings["nfold"]
    n_classes = len(classes)
    report_shot = max(shots)
    folds, n_query, hit_c, tot_c = _simpleshot_folds(emb, rows, codes, n_classes, hashes, settings)
    metrics = {}
    for s in shots:
        acc = np.asarray(folds[s])
        metrics[f"shot{s}_mean"] = float(acc.mean())
        metrics[f"shot{s}_std"] = float(acc.std(ddof=1)) if nfold > 1 else None
    return {
        "metrics": metrics,
        "per_class_accuracy": {classes[i]: float(hit_c[i] / tot_c[i]) for i in np.flatnonzero(tot_c)},
        "n_fit": int(n_classes * report_shot),
        "n_score": n_query[report_shot],
        "fit_info": {
            "seed": settings["seed"],
            "nfold": nfold,
            "shots": shots,
            "min_count": settings["min_count"],
            "fold_accuracy": {str(s): folds[s] for s in shots},
            "n_support": {str(s): int(n_classes * s) for s in shots},
            "n_query": {str(s): n_query[s] for s in shots},
            "per_class_accuracy_shot": report_shot,
            "std": "sample standard deviation over folds (ddof=1)",
        },
    }


FEWSHOT_RUNNERS = {
    "prototype_seed": (_prototype_seed_settings, _run_prototype_seed),
    "simpleshot": (_simpleshot_settings, _run_simpleshot),
}
"""Each ``fewshot`` protocol of the registry: (read and check its settings, run it on the kept pool rows)."""


def evaluate_bio(
    protocol: str,
    emb: np.ndarray,
    labels: np.ndarray,
    valid: np.ndarray,
    label_ids: pd.Series | None,
    split: np.ndarray,
    ids: Any,
    c: dict,
    path: Path,
) -> dict:
    """Run ``prototype_seed`` or ``simpleshot``; returns the protocol part of the result JSON."""
    chunk, seed, min_count = int(c["chunk_size"]), int(c["seed"]), int(c["min_count"])
    rows, codes, names, pool_splits, n_null = _pool_codes(labels, valid, label_ids, split, c, path)
    n_pool = len(rows)
    read_settings, run = FEWSHOT_RUNNERS[protocol]
    settings = {"seed": seed, "chunk": chunk, "min_count": min_count, **read_settings(c, min_count)}
    min_images = settings["min_images"]
    rows, codes, classes, excluded, n_excluded = _keep_classes(rows, codes, names, min_images, path, protocol)
    # keys from the row ids (row positions in the file when there is no 'id' column)
    hashes = id_hashes(ids.to_numpy()[rows]) if ids is not None else id_hashes(None, len(split))[rows]
    return {
        **run(emb, rows, codes, classes, hashes, settings),
        "n_excluded": n_excluded,
        "excluded_classes": excluded,
        "n_null_label": n_null,
        "n_classes": len(classes),
        "classes": classes,
        "pool_splits": pool_splits,
        "n_pool": int(n_pool),
        "min_images_per_class": int(min_images),
    }
