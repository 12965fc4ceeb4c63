"""Per-step schedules (linear warm-up then cosine), as in DINO."""
from __future__ import annotations

import numpy as np


def cosine_schedule(base: float, final: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """Values for steps 0..total_steps-1: linear from warmup_start to base over warmup_steps, then cosine to final."""
    if total_steps < 1:
        raise ValueError(f"total_steps: expected >= 1, got {total_steps}")
    warmup_steps = min(warmup_steps, total_steps)
    warmup = np.linspace(warmup_start, base, warmup_steps, endpoint=False) if warmup_steps else np.array([])
    rest = total_steps - warmup_steps
    steps = np.arange(rest)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(rest - 1, 1))) if rest else np.array([])
    return np.concatenate([warmup, cosine])


def teacher_temperature(warmup_temp: float, temp: float, warmup_epochs: int, epochs: int) -> np.ndarray:
    """Per-epoch teacher temperature: linear warm-up, then constant."""
    warm = np.linspace(warmup_temp, temp, warmup_epochs) if warmup_epochs else np.array([])
    return np.concatenate([warm, np.full(max(epochs - warmup_epochs, 0), temp)])[:epochs]
