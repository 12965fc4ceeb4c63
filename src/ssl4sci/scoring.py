"""What the frozen-embedding protocols (evaluate's fit/score protocols and the few-shot ones) share when they check
their settings and report: errors that name the embeddings file, positive-integer lists such as ``evaluate.topk``,
and the top-1 accuracy of each class."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def file_error(path: Path, msg: str) -> ValueError:
    """A ValueError that starts with the embeddings file it is about."""
    return ValueError(f"{path}: {msg}")


def positive_ints(value: Any, key: str, path: Path) -> list[int]:
    """``evaluate.{key}`` (one integer or a list of them, each >= 1) as a sorted list without repeats."""
    vals = [value] if isinstance(value, int) else list(value)
    if not vals or any(int(v) < 1 for v in vals):
        raise file_error(path, f"expected evaluate.{key} to be positive integers, got {value}")
    return sorted({int(v) for v in vals})


def topk_list(cfg: dict, path: Path) -> list[int]:
    """The k of every reported top-k accuracy (``evaluate.topk``), sorted."""
    return positive_ints(cfg["topk"], "topk", path)


def per_class_accuracy(correct: np.ndarray, y: np.ndarray, classes: list[str]) -> dict[str, float]:
    """Top-1 accuracy of each class present among the scored rows (O(rows + classes))."""
    n = len(classes)
    total = np.bincount(y, minlength=n)
    hits = np.bincount(y, weights=np.asarray(correct, dtype=np.float64), minlength=n)
    return {classes[i]: float(hits[i] / total[i]) for i in np.flatnonzero(total)}
