"""Evaluate stage: frozen-embedding evaluation protocols, one protocol on one embedding file, one JSON file out.

The protocols and their kinds are listed in :data:`ssl4sci.registry.protocols.PROTOCOLS`. The ``split`` protocols
(prototype, weighted k-NN, linear probe) fit on the ``fit_splits`` rows and score the ``score_split`` rows. The
``fewshot`` protocols ``prototype_seed`` and ``simpleshot`` (:mod:`ssl4sci.fewshot`) instead re-split a pool of rows
with a seeded, protocol-defined split. The ``label_free`` protocol ``spectrum`` reads no labels: it measures the
effective rank and the top principal components' variance share of the ``fit_splits`` embeddings (dimensional collapse,
:mod:`ssl4sci.spectrum`). Every protocol that reads labels can be run at a taxonomic rank (``rank="genus"``...): the
class label is then that column of the embeddings file instead of ``label``; rows whose label is null or empty are
excluded and counted (``n_null_label``).

The similarity-based protocols never materialise a full queries x keys similarity matrix (:mod:`ssl4sci.knn`).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from .fewshot import evaluate_bio
from .io import write_json
from .knn import knn_true_class_rank, prototype_ranks
from .labels import RANKS, some_names
from .probes import load_embeddings
from .registry.protocols import PROTOCOLS
from .scoring import file_error, per_class_accuracy, topk_list
from .spectrum import spectrum_summary


# --------------------------------------------------------------------------- labels and classes
def label_column(df: pd.DataFrame, rank: str | None, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The class label of every row: ``label`` (``rank`` None) or the ``rank`` column.

    Returns ``(labels as str object array, valid mask)``; null and empty/blank labels are invalid
    (their entry in ``labels`` is ``""``).
    """
    column = "label" if rank is None else rank
    if column not in df.columns:
        what = "a 'label' column" if rank is None else f"a {rank!r} column for rank={rank!r}"
        raise file_error(path, f"expected {what}, found columns {list(df.columns)}")
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
            raise file_error(path, "expected a one-to-one mapping between 'label' and 'label_id'")
        fit_pairs = pairs[fit_mask[valid]].drop_duplicates().sort_values("label_id")
        return fit_pairs["label"].tolist()
    return sorted(pd.unique(labels[fit_mask & valid]).tolist())


def _coverage_warnings(classes: list[str], y_score: np.ndarray, excluded: list[str], n_excluded: int, metrics: dict,
                       fit_splits: list[str], score_split: str) -> list[str]:
    """What the metrics leave out: classes only in the score split, fit classes the score split lacks."""
    found = []
    if excluded:
        found.append(f"{n_excluded} {score_split!r} rows of {len(excluded)} class(es) absent from fit_splits "
                     f"{fit_splits} are not scored: {some_names(excluded)}")
    absent = [c for i, c in enumerate(classes) if not (y_score == i).any()]
    if absent:
        found.append(f"{len(absent)} of {len(classes)} fit classes have no {score_split!r} rows, the metrics cover "
                     f"the others: {some_names(absent)}")
    if "macro_auc" in metrics and metrics["macro_auc"] is None:
        found.append(f"macro_auc is null: the {score_split!r} rows hold one class only")
    return found


def _resolve_rank(rank: str | None, c: dict, path: Path) -> str | None:
    """The rank column to read (the argument, else ``rank`` of the config); None for the ``label`` column."""
    rank = c.get("rank") if rank is None else rank
    if rank is None or rank == "label":
        return None
    if rank not in RANKS:
        raise file_error(path, f"unknown rank {rank!r}, expected one of {', '.join(RANKS)} "
                               "(or null for the 'label' column)")
    return str(rank)


def evaluate(
    embeddings_path: str | os.PathLike,
    protocol: str,
    cfg: dict,
    out_path: str | os.PathLike,
    rank: str | None = None,
) -> dict:
    """Run one protocol on one embedding file, write JSON to ``out_path`` atomically, return it.

    ``protocol``: a key of :data:`ssl4sci.registry.protocols.PROTOCOLS`; its kind says how it is run: ``split``
    (fit/score on the manifest's splits), ``fewshot`` (seeded re-split of the ``pool_splits`` rows, see
    :mod:`ssl4sci.fewshot`) or ``label_free`` (no labels). ``cfg``: the validated ``evaluate`` config section.
    ``rank``: a taxonomic rank column (``RANKS``) used as the class label instead of ``label``;
    ``None`` falls back to ``cfg["rank"]`` and then to ``label`` (the lensing behaviour).
    """
    path = Path(embeddings_path)
    if protocol not in PROTOCOLS:
        raise file_error(path, f"unknown protocol {protocol!r}, expected one of {', '.join(PROTOCOLS)}")
    kind = PROTOCOLS[protocol].kind
    cfg = dict(cfg)
    rank = _resolve_rank(rank, cfg, path)
    if rank is not None and kind == "label_free":
        raise file_error(path, f"protocol {protocol!r} uses no labels, expected no taxonomic rank (got {rank!r})")

    df, emb, meta = load_embeddings(path)
    if not all(np.isfinite(emb[a : a + 65536]).all() for a in range(0, len(emb), 65536)):
        raise file_error(path, "expected finite embeddings, found NaN or inf")
    if "split" not in df.columns:
        raise file_error(path, "expected a 'split' column")
    split = df["split"].astype(str).to_numpy()
    if kind == "label_free":
        part = _evaluate_spectrum(emb, split, cfg, path)
    else:
        labels, valid = label_column(df, rank, path)
        label_ids = df["label_id"] if rank is None and "label_id" in df.columns else None
        if kind == "fewshot":
            part = evaluate_bio(protocol, emb, labels, valid, label_ids, split, df.get("id"), cfg, path)
        else:
            part = _evaluate_fit_score(protocol, emb, labels, valid, label_ids, split, cfg, path)

    result = {
        "method": meta.get("method", path.stem),
        "protocol": protocol,
        "rank": rank,
        **part,
        "embed_dim": int(emb.shape[1]),
        "config": cfg,
        "embeddings": {
            "path": str(path),
            "checkpoint_sha256": meta.get("checkpoint_sha256"),
            "model": meta.get("model"),
        },
    }
    write_json(out_path, result)
    return result


def _fit_splits(c: dict) -> list[str]:
    return [c["fit_splits"]] if isinstance(c["fit_splits"], str) else [str(v) for v in c["fit_splits"]]


def _evaluate_spectrum(emb: np.ndarray, split: np.ndarray, c: dict, path: Path) -> dict:
    """``spectrum``: effective rank (RankMe) and PC1 / PC1+PC2 variance shares of the ``fit_splits`` rows."""
    fit_splits = _fit_splits(c)
    fit_mask = np.isin(split, fit_splits)
    if not fit_mask.any():
        raise file_error(path, f"no rows in evaluate.fit_splits {fit_splits}, expected embeddings to measure")
    return {"metrics": spectrum_summary(emb[fit_mask]), "n_fit": int(fit_mask.sum()), "fit_splits": fit_splits}


# --------------------------------------------------------------------------- the split protocols
def _split_masks(
    split: np.ndarray, valid: np.ndarray, fit_splits: list[str], score_split: str, path: Path
) -> tuple[np.ndarray, np.ndarray, int]:
    """``(fit rows with a label, score rows, rows of either without a label)``; every named split must have rows."""
    if score_split in fit_splits:
        raise file_error(path, f"score_split {score_split!r} must not be one of fit_splits {fit_splits}")
    for s in [*fit_splits, score_split]:
        if not (split == s).any():
            raise file_error(path, f"split {s!r} has no rows, expected rows for fit_splits={fit_splits} and "
                                   f"score_split={score_split!r}")
    fit_mask = np.isin(split, fit_splits)
    score_mask = split == score_split
    n_null = int(((fit_mask | score_mask) & ~valid).sum())
    fit_mask &= valid
    if not fit_mask.any():
        raise file_error(path, f"every row of fit_splits {fit_splits} has a null label")
    return fit_mask, score_mask, n_null


def _score_prototype(
    x_fit: np.ndarray, y_fit: np.ndarray, x_score: np.ndarray, y_score: np.ndarray, classes: list[str], cfg: dict,
    path: Path
) -> tuple[dict, np.ndarray, dict]:
    """``prototype``: top-k accuracies of the classes ranked by cosine similarity to the fit classes' prototypes."""
    n_classes = len(classes)
    ks = topk_list(cfg)
    kmax = min(max(ks), n_classes)
    top = prototype_ranks(x_fit, y_fit, x_score, n_classes, kmax, int(cfg["chunk_size"]))
    hits = top == y_score[:, None]
    metrics = {f"top{k}": float(hits[:, : min(k, n_classes)].any(axis=1).mean()) for k in ks}
    return metrics, hits[:, 0], {}


def _score_knn(
    x_fit: np.ndarray, y_fit: np.ndarray, x_score: np.ndarray, y_score: np.ndarray, classes: list[str], cfg: dict,
    path: Path
) -> tuple[dict, np.ndarray, dict]:
    """``knn``: top-1 and top-5 accuracies of DINO's weighted k-NN vote over the fit rows."""
    n_classes = len(classes)
    k, t = int(cfg["knn_k"]), float(cfg["knn_temperature"])
    rank, top1 = knn_true_class_rank(x_fit, y_fit, x_score, y_score, min(k, len(y_fit)), t, int(cfg["chunk_size"]))
    metrics = {f"top{j}": float((rank < min(j, n_classes)).mean()) for j in (1, 5)}
    return metrics, top1 == y_score, {"k": min(k, len(y_fit)), "temperature": t}


def _score_linear(
    x_fit: np.ndarray, y_fit: np.ndarray, x_score: np.ndarray, y_score: np.ndarray, classes: list[str], cfg: dict,
    path: Path
) -> tuple[dict, np.ndarray, dict]:
    """``linear``: accuracy and one-vs-rest AUCs of a logistic regression on standardised fit features."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    n_classes = len(classes)
    if n_classes < 2:
        raise file_error(path, f"linear probe expects at least 2 classes in the fit splits, found {n_classes}")
    scaler = StandardScaler().fit(x_fit)
    clf = LogisticRegression(C=float(cfg["linear_C"]), max_iter=int(cfg["linear_max_iter"]),
                             random_state=int(cfg["seed"]))
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


SPLIT_SCORERS = {"prototype": _score_prototype, "knn": _score_knn, "linear": _score_linear}
"""How each ``split`` protocol of the registry scores: ``(metrics, correct top-1 per score row, fit_info)``."""


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
    """The ``split`` protocols: fit on ``fit_splits``, score ``score_split``."""
    fit_splits = _fit_splits(c)
    score_split = str(c["score_split"])
    fit_mask, score_mask, n_null = _split_masks(split, valid, fit_splits, score_split, path)
    classes = _class_table(labels, label_ids, fit_mask, valid, path)
    codes = pd.Index(classes).get_indexer(labels).astype(np.int64)  # -1: class not in the fit splits
    codes[~valid] = -1

    excluded = score_mask & valid & (codes < 0)
    score_mask &= codes >= 0
    if not score_mask.any():
        raise file_error(
            path,
            f"no {score_split!r} rows have a class present in {fit_splits}; expected test classes among {classes}",
        )
    if len(classes) < 2:  # one class: every prediction is right, a metric of 1 that means nothing
        raise file_error(path, f"{protocol} expects at least 2 classes in fit_splits {fit_splits}, found "
                               f"{len(classes)} ({', '.join(map(repr, classes))})")
    y_fit, y_score = codes[fit_mask], codes[score_mask]
    metrics, correct, fit_info = SPLIT_SCORERS[protocol](emb[fit_mask], y_fit, emb[score_mask], y_score, classes, c,
                                                         path)
    excluded_classes = sorted(set(labels[excluded].tolist()))
    return {
        "metrics": metrics,
        "per_class_accuracy": per_class_accuracy(correct, y_score, classes),
        "warnings": _coverage_warnings(classes, y_score, excluded_classes, int(excluded.sum()), metrics, fit_splits,
                                       score_split),
        "n_fit": int(len(y_fit)),
        "n_score": int(len(y_score)),
        "n_excluded": int(excluded.sum()),
        "excluded_classes": excluded_classes,
        "n_null_label": n_null,
        "n_classes": len(classes),
        "classes": classes,
        "fit_info": fit_info,
        "fit_splits": fit_splits,
        "score_split": score_split,
    }
