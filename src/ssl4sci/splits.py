"""Splitting labelled images: the seeded stratified train/val/test split, the unlabelled pool beside it (split
``unlabelled``, what a source knows about it cut), and the warnings a split gives a later stage.

Both prepare stages (lensing arrays and photos) split with these, so a data set splits the same whichever wrote it.
"""
from __future__ import annotations

import sys

import numpy as np
import pandas as pd

from ssl4sci.data import UNLABELLED
from ssl4sci.io import POOL_COLUMN
from ssl4sci.labels import RANKS, some_names

# Pool rows keep these numeric columns (provenance); every other numeric column is truth and becomes NaN.
POOL_KEPT_COLUMNS = ("index", "seed", "source_index", "shard")
# Text columns that name what an image shows, nulled for pool rows (other text columns are provenance: ids, paths).
POOL_CUT_TEXT_COLUMNS = (*RANKS, "common")


def stratified_split(labels: pd.Series, fractions: dict[str, float], seed: int) -> np.ndarray:
    """Seeded per-class split; each class keeps the train/val/test proportions (rounded), and at least one train
    image when the train fraction is not 0 (a class seen only in val or test could be scored but never learned)."""
    rng = np.random.default_rng(seed)
    split = np.empty(len(labels), dtype=object)
    for label in sorted(labels.unique()):
        idx = np.flatnonzero(labels.to_numpy() == label)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(fractions["test"] * len(idx)))
        n_val = int(round(fractions["val"] * len(idx)))
        if fractions["train"] > 0:
            n_test = min(n_test, len(idx) - 1)
            n_val = min(n_val, len(idx) - 1 - n_test)
        split[idx[:n_test]] = "test"
        split[idx[n_test : n_test + n_val]] = "val"
        split[idx[n_test + n_val :]] = "train"
    return split.astype(str)


def pool_mask(table: pd.DataFrame) -> np.ndarray:
    """Which rows of a raw truth / metadata table a source marked as the unlabelled pool (none without the column)."""
    if POOL_COLUMN not in table.columns:
        return np.zeros(len(table), dtype=bool)
    return table[POOL_COLUMN].fillna(False).astype(bool).to_numpy()


def split_with_pool(labels: pd.Series, pool: np.ndarray, fractions: dict[str, float], seed: int) -> np.ndarray:
    """:func:`stratified_split` of the labelled rows; pool rows get the split ``unlabelled``."""
    split = np.full(len(labels), UNLABELLED, dtype=object)
    split[~pool] = stratified_split(labels[~pool].reset_index(drop=True), fractions, seed)
    return split.astype(str)


def cut_pool_labels(manifest: pd.DataFrame, pool: np.ndarray) -> pd.DataFrame:
    """Cut what a source knows about the pool rows: label "", label_id -1, null taxonomy ranks (and common
    name), NaN in every numeric truth column (regression targets such as log10_m_axion); provenance stays."""
    manifest = manifest.drop(columns=[POOL_COLUMN], errors="ignore")  # the split says it now
    if not pool.any():
        return manifest
    for col in manifest.columns:
        if col in POOL_KEPT_COLUMNS or col in ("label", "label_id"):
            continue
        if col in POOL_CUT_TEXT_COLUMNS:
            manifest[col] = manifest[col].astype(object)
            manifest.loc[pool, col] = None
        elif pd.api.types.is_numeric_dtype(manifest[col]) and not pd.api.types.is_bool_dtype(manifest[col]):
            manifest[col] = manifest[col].astype(np.float64)
            manifest.loc[pool, col] = np.nan
    manifest.loc[pool, "label"] = ""
    manifest.loc[pool, "label_id"] = -1
    return manifest


def split_warnings(counts: dict[str, dict[str, int]], fractions: dict[str, float], classes: list[str]) -> list[str]:
    """What a later stage should know about the split: one class only, classes missing from val or test.

    Each line is also printed to stderr, prefixed ``prepare: warning:``."""
    found = []
    if len(classes) == 1:
        found.append(f"one class only ({classes[0]!r}): the label-based evaluations need at least 2")
    for split in ("val", "test"):
        missing = [c for c in classes if fractions[split] > 0 and counts[split][c] == 0]
        if missing:
            found.append(f"{len(missing)} class(es) have no {split} images, too few to split: {some_names(missing)}")
    for line in found:
        print(f"prepare: warning: {line}", file=sys.stderr)
    return found
