#!/usr/bin/env python
"""Print how much each self-supervised method gains over untrained weights of its own architecture.

    python benchmarks/ssl_quality.py [results/lensing_default]

Reads what the pipeline wrote (summary.json from the report stage, pretrain/<method>/metrics.csv) and prints,
per trained method: k-NN top-1 and linear-probe accuracy on the held-out split next to its untrained baseline's
(random_init, or random_init_<method> when the method has its own backbone, e.g. EsViT's Swin), the gains in
points against the +10-point target; the effective rank (RankMe) of its embeddings on the train split next to the
baseline's against the target of at least half; and the training run's own record (final loss, online k-NN on
val, effective rank before training and at the end with PC1's variance share, teacher KL, crop rejection rate,
wall time). The same table is in the report's "Self-supervised vs untrained
weights" section. Run `snakemake` (or `make run`) first; this script trains nothing.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from ssl4sci.report import TARGET_GAIN, TARGET_RANK_RATIO, ssl_gains  # noqa: E402


def main(results: Path) -> int:
    summary_path = results / "summary.json"
    if not summary_path.exists():
        print(f"{summary_path}: missing; run the pipeline first (make run)", file=sys.stderr)
        return 1
    summary = json.loads(summary_path.read_text())
    gains = ssl_gains(summary)
    if not gains:
        print(f"{summary_path}: no trained method with an untrained baseline to compare", file=sys.stderr)
        return 1
    table = pd.DataFrame(gains)
    for col in ("knn_gain", "linear_gain"):
        table[col] = table[col] * 100
    print(f"Held-out accuracy vs untrained weights ({results}); target: +{TARGET_GAIN * 100:.0f} points in both")
    columns = {"method": "method", "baseline": "baseline", "knn_top1": "knn", "knn_top1_baseline": "knn_base",
               "knn_gain": "knn_gain_pts", "linear_accuracy": "linear", "linear_accuracy_baseline": "linear_base",
               "linear_gain": "linear_gain_pts", "meets_target": "target_met"}
    print(table[list(columns)].rename(columns=columns).to_string(index=False, float_format=lambda v: f"{v:7.3f}"))
    print(f"\nEffective rank of the embeddings (train split) vs untrained weights; target: >= {TARGET_RANK_RATIO:g} x")
    columns = {"method": "method", "baseline": "baseline", "effective_rank": "rank",
               "effective_rank_baseline": "rank_base", "rank_ratio": "ratio", "meets_rank_target": "target_met"}
    print(table[list(columns)].rename(columns=columns).to_string(index=False, float_format=lambda v: f"{v:7.3f}"))

    print("\nTraining record (last epoch):")
    rows = []
    for row in gains:
        metrics = results / "pretrain" / row["method"] / "metrics.csv"
        if not metrics.exists():
            continue
        history = pd.read_csv(metrics)
        last = history.iloc[-1]
        knn = history["knn_val"].dropna() if "knn_val" in history else pd.Series(dtype=float)
        rank = history["effective_rank"].dropna() if "effective_rank" in history else pd.Series(dtype=float)
        pc1 = history["pc1_share"].dropna() if "pc1_share" in history else pd.Series(dtype=float)
        rows.append({"method": row["method"], "epochs": int(last["epoch"]) + 1, "steps": int(last["step"]),
                     "loss_first": float(history["train_loss"].iloc[0]), "loss_last": float(last["train_loss"]),
                     "knn_val_best": float(knn.max()) if len(knn) else float("nan"),
                     "knn_val_last": float(knn.iloc[-1]) if len(knn) else float("nan"),
                     "rank_init": float(last.get("effective_rank_init", float("nan"))),
                     "rank_last": float(rank.iloc[-1]) if len(rank) else float("nan"),
                     "pc1_last": float(pc1.iloc[-1]) if len(pc1) else float("nan"),
                     "teacher_kl": float(last.get("teacher_kl", float("nan"))),
                     "crop_reject_rate": float(last.get("crop_reject_rate", float("nan"))),
                     "train_min": float(last["time_s"]) / 60})
    if rows:
        print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:7.3f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("results/lensing_default")))
