#!/usr/bin/env python
"""Why k-NN is the weak protocol: the evaluate stage's weighted k-NN on transformed copies of each embedding file.

    python benchmarks/knn_features.py results/lensing_default/embeddings/*.parquet

For every file: k-NN top-1 on the test split (k and temperature of config/config.yaml's evaluate section) with the
features as exported (cosine similarity of the raw pooled feature), centred on the train mean (cosine around the cloud's
centre instead of the origin), standardised per dimension, and PCA-whitened; next to the spectrum of the train
features (effective rank, share of variance in the first principal component). When the cloud is far from the origin
or stretched along one direction, raw cosine similarity mostly measures the position along that direction, and the
neighbours it finds are not the ones a centred or whitened metric finds. One line of JSON per file.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ssl4sci.config import load_config  # noqa: E402
from ssl4sci.knn import knn_true_class_rank  # noqa: E402
from ssl4sci.probes import load_embeddings  # noqa: E402
from ssl4sci.spectrum import effective_rank, variance_shares  # noqa: E402


def feature_variants(x: np.ndarray, fit: np.ndarray) -> dict[str, np.ndarray]:
    """The exported features and three re-metrics of them, all fitted on the ``fit`` rows only."""
    centred = x - x[fit].mean(axis=0)
    std = centred[fit].std(axis=0)
    _, s, vt = np.linalg.svd(centred[fit].astype(np.float64), full_matrices=False)
    keep = s > s[0] * 1e-3  # directions with (numerically) no variance would blow up when whitened
    return {"raw": x, "centred": centred, "standardised": centred / np.where(std > 0, std, 1.0),
            "whitened": (centred @ vt[keep].T / s[keep]).astype(np.float32)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("embeddings", nargs="+")
    args = parser.parse_args()
    cfg = load_config(ROOT / "config" / "config.yaml")["evaluate"]
    for path in args.embeddings:
        df, x, meta = load_embeddings(path)
        split, y = df["split"].to_numpy(), df["label_id"].to_numpy()
        fit, score = split == "train", split == "test"
        spread = np.sqrt(x[fit].var(0).sum())
        row = {"file": path, "method": meta.get("method", Path(path).stem), "dim": int(x.shape[1]),
               "effective_rank": round(effective_rank(x[fit]), 1),
               "pc1_share": round(float(variance_shares(x[fit], 1)[0]), 3),
               "mean_norm_over_spread": round(float(np.linalg.norm(x[fit].mean(0)) / spread), 2)}
        for name, feats in feature_variants(x, fit).items():
            k = min(cfg["knn_k"], int(fit.sum()))
            _, top1 = knn_true_class_rank(feats[fit], y[fit], feats[score], y[score], k, cfg["knn_temperature"],
                                          chunk_size=4096)
            row[f"knn_{name}"] = round(float(np.mean(top1 == y[score])), 3)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
