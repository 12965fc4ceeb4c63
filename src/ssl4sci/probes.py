"""Pieces shared by the stages that probe frozen embeddings (evaluate, label_efficiency); no stage owns them.

``load_embeddings`` reads an ``embeddings/{method}.parquet`` file; ``fit_logistic_probe`` fits a logistic regression
on standardised features with its inverse regularisation C chosen on a validation set (recipes are chosen on val,
results are reported on test).
"""
from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

EMBEDDING_COLUMN = "embedding"


def load_embeddings(path: str | os.PathLike) -> tuple[pd.DataFrame, np.ndarray, dict[str, str]]:
    """Read an embedding parquet file.

    Returns ``(manifest DataFrame without the embedding column, float32 array (N, D),
    file key-value metadata as str -> str)``.  The fixed-size-list column is
    converted with one flatten + reshape, no per-row Python work.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: embedding file not found")
    table = pq.read_table(path)
    if EMBEDDING_COLUMN not in table.column_names:
        raise ValueError(
            f"{path}: expected an '{EMBEDDING_COLUMN}' column (fixed_size_list<float32>), "
            f"found columns {table.column_names}"
        )
    column = table.column(EMBEDDING_COLUMN)
    n = table.num_rows
    arr = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if arr.null_count:
        raise ValueError(f"{path}: '{EMBEDDING_COLUMN}' has {arr.null_count} null rows, expected none")
    if pa.types.is_fixed_size_list(arr.type):
        dim = arr.type.list_size
        values = arr.flatten()  # honours the array offset
    elif pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        offsets = np.asarray(arr.offsets)
        lengths = np.diff(offsets)
        if n and not np.all(lengths == lengths[0]):
            raise ValueError(f"{path}: '{EMBEDDING_COLUMN}' rows have different lengths, expected a fixed size")
        dim = int(lengths[0]) if n else 0
        values = arr.flatten()
    else:
        raise ValueError(f"{path}: '{EMBEDDING_COLUMN}' has type {arr.type}, expected fixed_size_list<float32>")
    if values.null_count:
        raise ValueError(f"{path}: '{EMBEDDING_COLUMN}' contains null values")
    if not (pa.types.is_floating(values.type) or pa.types.is_integer(values.type)):
        raise ValueError(f"{path}: '{EMBEDDING_COLUMN}' values have type {values.type}, expected float32")
    emb = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(n, dim)

    raw = table.schema.metadata or {}
    meta = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in raw.items() if k != b"pandas"}
    df = table.drop_columns([EMBEDDING_COLUMN]).to_pandas()
    return df, emb, meta


def _macro_auc(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean one-vs-rest ROC AUC over the classes present with both positives and negatives (nan if none)."""
    from sklearn.metrics import roc_auc_score

    aucs = [roc_auc_score(y == k, probs[:, k]) for k in range(probs.shape[1]) if 0 < (y == k).sum() < len(y)]
    return float(np.mean(aucs)) if aucs else float("nan")


class LogisticProbe:
    """A fitted probe: standardisation + logistic regression, with probabilities over all ``n_classes``."""

    def __init__(self, scaler: Any, classifier: Any, n_classes: int, C: float):
        self.scaler, self.classifier, self.n_classes, self.C = scaler, classifier, n_classes, C

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """(N, n_classes) probabilities; a class absent from the fit rows gets probability 0."""
        probs = np.zeros((len(x), self.n_classes))
        probs[:, self.classifier.classes_] = self.classifier.predict_proba(self.scaler.transform(x))
        return probs


def fit_logistic_probe(x_fit: np.ndarray, y_fit: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                       n_classes: int, Cs: Sequence[float], max_iter: int, seed: int) -> tuple[LogisticProbe, dict]:
    """Fit one logistic regression per C on the fit rows; keep the one with the best val macro AUC.

    Ties go to the smaller C (stronger regularisation). With a single C no val rows are needed. Returns the probe
    and ``{"C": chosen, "val_macro_auc": {C: value}}``.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(y_fit)) < 2:
        raise ValueError(f"a linear probe needs at least 2 classes among its fit rows, got {len(np.unique(y_fit))}")
    scaler = StandardScaler().fit(x_fit)
    z_fit = scaler.transform(x_fit)
    probes, val_scores = [], {}
    # One classifier walks the C grid upwards, each fit starting from the last solution (warm start): the same
    # optima as separate fits, in a fraction of the iterations.
    classifier = LogisticRegression(max_iter=max_iter, random_state=seed, warm_start=True)
    for C in sorted(float(c) for c in Cs):
        classifier.set_params(C=C)
        with warnings.catch_warnings():
            # Tiny subsets separate perfectly; an unconverged fit there is still the probe asked for.
            warnings.simplefilter("ignore", ConvergenceWarning)
            classifier.fit(z_fit, y_fit)
        probes.append(LogisticProbe(scaler, copy.deepcopy(classifier), n_classes, C))
        if len(Cs) > 1:
            val_scores[f"{C:g}"] = _macro_auc(probes[-1].probabilities(x_val), y_val)
    scores = [s if np.isfinite(s) else -np.inf for s in val_scores.values()] or [0.0]
    best = int(np.argmax(scores))  # the first maximum: ties go to the smaller C
    return probes[best], {"C": probes[best].C, "val_macro_auc": val_scores}
