"""What the frozen-embedding protocols (evaluate's fit/score protocols and the few-shot ones) share when they read
their settings and report: errors that name the embeddings file, integer lists such as ``evaluate.topk`` in order,
and the top-1 accuracy of each class. The settings arrive validated by the schema."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def file_error(path: Path, msg: str) -> ValueError:
    """A ValueError that starts with the embeddings file it is about."""
    return ValueError(f"{path}: {msg}")


def sorted_ints(value: int | list[int]) -> list[int]:
    """One integer or a list of them (``evaluate.topk``, ``evaluate.shots``) as a sorted list without repeats."""
    return sorted({int(v) for v in ([value] if isinstance(value, int) else value)})


def topk_list(cfg: dict) -> list[int]:
    """The k of every reported top-k accuracy (``evaluate.topk``), sorted."""
    return sorted_ints(cfg["topk"])


def per_class_accuracy(correct: np.ndarray, y: np.ndarray, classes: list[str]) -> dict[str, float]:
    """Top-1 accuracy of each class present among the scored rows (O(rows + classes))."""
    n = len(classes)
    total = np.bincount(y, minlength=n)
    hits = np.bincount(y, weights=np.asarray(correct, dtype=np.float64), minlength=n)
    return {classes[i]: float(hits[i] / total[i]) for i in np.flatnonzero(total)}
