"""Scores shared by the evaluation protocols (ssl4sci.scoring)."""
from __future__ import annotations

import numpy as np

from ssl4sci.scoring import per_class_accuracy


def test_per_class_accuracy_matches_loop():
    rng = np.random.default_rng(15)
    y = rng.integers(0, 50, 1000)
    y[y == 7] = 8  # class 7 absent: not reported
    correct = rng.random(1000) < 0.3
    names = [f"c{i}" for i in range(50)]
    ref = {n: float(correct[y == i].mean()) for i, n in enumerate(names) if (y == i).any()}
    assert per_class_accuracy(correct, y, names) == ref and "c7" not in ref
