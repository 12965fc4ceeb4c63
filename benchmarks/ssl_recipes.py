#!/usr/bin/env python
"""Train and score the recipe variants behind the default's settings, on the default's prepared data.

    python benchmarks/ssl_recipes.py [--data results/lensing_default/data] [--only NAME ...] [--out /tmp/ssl_recipes]

Each variant is config/config.yaml with a few keys overridden; it is pretrained (if it trains), embedded, and
scored with the evaluate stage's k-NN and linear probe on the test split, exactly as the pipeline does. One line of
JSON per variant is printed (and appended to <out>/results.jsonl): settings, k-NN top-1, linear accuracy,
effective rank of the train embeddings, pretraining seconds, and the epoch record (loss, teacher KL, crop rejection
rate, online k-NN on val, effective rank). A variant the
collapse guard stops prints its one-line reason instead. The whole list takes about 35 minutes on 2 CPU cores;
docs/results.md records a run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ssl4sci.config import load_config, model_for  # noqa: E402

OLD = {"pretrain.base_lr": 0.008, "pretrain.teacher_temp": 0.04, "pretrain.warmup_teacher_temp": 0.04, "pretrain.epochs": 40}
SWIN_48 = {"name": "swin_tiny_patch4_window7_224", "patch_size": 4, "window_size": 4, "embed_dim": 48,
           "depths": [2, 2, 2], "num_heads": [3, 6, 12]}
VARIANTS: dict[str, tuple[str, dict]] = {
    # untrained baselines
    "random_init": ("random_init", {}),
    "random_init_patch8": ("random_init", {"model.patch_size": 8}),
    "random_init_swin48": ("random_init_esvit", {"pretrain.esvit.model": SWIN_48}),
    "random_init_swin32": ("random_init_esvit", {}),
    # DINO: issue 2's recipe with random-resized (zooming) crops, then native-scale crops, then the default
    "dino_zoom_lr8e-3_t0.04_e40": ("dino", {**OLD, "pretrain.augment.zoom": True}),
    "dino_native_lr8e-3_t0.04_e40": ("dino", OLD),
    "dino_default": ("dino", {}),
    # EsViT on the 48-wide Swin: two settings the guard stops, one that trains; then the default (32-wide, 20 epochs)
    "esvit_swin48_lr8e-3_t0.04_e40": ("esvit", {**OLD, "pretrain.esvit.model": SWIN_48}),
    "esvit_swin48_lr8e-3_t0.02_e40": ("esvit", {**OLD, "pretrain.teacher_temp": 0.02, "pretrain.warmup_teacher_temp": 0.02,
                                                "pretrain.esvit.model": SWIN_48}),
    "esvit_swin48_lr4e-3_t0.02_e40": ("esvit", {"pretrain.epochs": 40, "pretrain.esvit.model": SWIN_48}),
    "esvit_default": ("esvit", {}),
}


def run_variant(name: str, method: str, overrides: dict, data: Path, out: Path) -> dict:
    import pandas as pd

    from ssl4sci.embed import embed
    from ssl4sci.evaluate import evaluate
    from ssl4sci.pretrain import pretrain
    from ssl4sci.ssl.guard import NonFiniteLoss, TrainingCollapsed

    cfg = load_config(ROOT / "config" / "config.yaml", overrides)
    folder = out / name
    result: dict = {"name": name, "method": method, "overrides": overrides}
    start = time.time()
    checkpoint = None
    if not method.startswith("random_init"):
        try:
            checkpoint = pretrain(data, folder / "pretrain", method, cfg["pretrain"], model_for(cfg, method), device="cpu",
                                  threads=2, progress=False)
        except (TrainingCollapsed, NonFiniteLoss) as stop:
            return {**result, "stopped": str(stop).split("; the last good checkpoint")[0]}
        history = pd.read_csv(folder / "pretrain" / "metrics.csv")
        keep = [c for c in ("epoch", "train_loss", "teacher_kl", "crop_reject_rate", "knn_val", "effective_rank")
                if c in history]
        result["history"] = history[keep].round(4).to_dict("list")
    result["pretrain_s"] = round(time.time() - start, 1)
    embeddings = embed(data, folder / "embeddings.parquet", method, checkpoint, cfg["embed"], model_for(cfg, method),
                       device="cpu", threads=2)
    result["knn_top1"] = evaluate(embeddings, "knn", cfg["evaluate"], folder / "knn.json")["metrics"]["top1"]
    result["linear_accuracy"] = evaluate(embeddings, "linear", cfg["evaluate"], folder / "linear.json")["metrics"]["accuracy"]
    result["effective_rank"] = evaluate(embeddings, "spectrum", cfg["evaluate"], folder / "spectrum.json")["metrics"][
        "effective_rank"]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT / "results" / "lensing_default" / "data"))
    parser.add_argument("--only", nargs="*", choices=sorted(VARIANTS), help="variants to run (default: all)")
    parser.add_argument("--out", default="/tmp/ssl_recipes")
    args = parser.parse_args()
    data, out = Path(args.data), Path(args.out)
    if not (data / "manifest.parquet").exists():
        print(f"{data}: no prepared data; run the pipeline up to prepare first (snakemake prepare)", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    for name in args.only or VARIANTS:
        method, overrides = VARIANTS[name]
        line = json.dumps(run_variant(name, method, overrides, data, out))
        print(line, flush=True)
        with open(out / "results.jsonl", "a") as fh:
            fh.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
