#!/usr/bin/env python
"""Train and score the recipe variants behind the default's settings, on the default's prepared data.

    python benchmarks/ssl_recipes.py [--data results/lensing_default/data] [--only NAME ...] [--out /tmp/ssl_recipes]

The pool-size variants need a pool of 5,400 images: prepare it once with
    snakemake --profile profiles/local --config experiment=lensing_pool5400 simulate='{n_unlabelled: 5400}' \
        -- results/lensing_pool5400/data/manifest.parquet
and pass --data results/lensing_pool5400/data (the labelled images are the default's: the pool only adds images).

Each variant is config/config.yaml with a few keys overridden; it is pretrained (if it trains), embedded, and
scored with the evaluate stage's k-NN and linear probe on the test split, exactly as the pipeline does. One line of
JSON per variant is printed (and appended to <out>/results.jsonl): settings, k-NN top-1, linear accuracy,
effective rank of the train embeddings, pretraining seconds, and the epoch record (loss, teacher KL, crop rejection
rate, online k-NN on val, effective rank). A variant the
collapse guard stops prints its one-line reason instead. Each training variant takes 2-7 minutes on 2 CPU cores;
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

# Issue 9's research: the default's labelled set plus an unlabelled pool sized by pretrain.max_unlabelled.
# Every variant names the keys it depends on, so it reproduces whatever the current default is.
POOL = {"pretrain.methods": ["dino"], "pretrain.max_unlabelled": 1800, "pretrain.epochs": 5,
        "pretrain.warmup_epochs": 1, "pretrain.koleo_weight": 0.0, "attention.methods": [], "finetune.methods": []}
RESNET18 = {"model.name": "resnet18", "model.drop_path_rate": 0.0}
RESNET10T = {"model.name": "resnet10t", "model.drop_path_rate": 0.0}
VARIANTS: dict[str, tuple[str, dict]] = {
    # untrained baselines of each architecture
    "random_init_vit": ("random_init", {}),
    "random_init_resnet18": ("random_init", RESNET18),
    "random_init_resnet10t": ("random_init", RESNET10T),
    "random_init_swin32": ("random_init_esvit", {}),
    # DINO on the ViT: the labelled train split only (issue 5's default), then with the pool, 375 steps each
    "dino_pool0_e20": ("dino", {**POOL, "pretrain.max_unlabelled": 0, "pretrain.epochs": 20,
                                "pretrain.warmup_epochs": 2}),
    "dino_pool1800_e5": ("dino", POOL),
    "dino_pool1800_e5_out1024_t0.04": ("dino", {**POOL, "pretrain.out_dim": 1024, "pretrain.teacher_temp": 0.04}),
    # KoLeo against the dimensional collapse, three weights; then more steps and a larger pool at that weight
    "dino_pool1800_e5_koleo0.1": ("dino", {**POOL, "pretrain.koleo_weight": 0.1}),
    "dino_pool1800_e5_koleo0.25": ("dino", {**POOL, "pretrain.koleo_weight": 0.25}),
    "dino_pool1800_e5_koleo0.5": ("dino", {**POOL, "pretrain.koleo_weight": 0.5}),
    "dino_pool5400_e2_koleo0.25": ("dino", {**POOL, "pretrain.max_unlabelled": 5400, "pretrain.epochs": 2,
                                            "pretrain.warmup_epochs": 0, "pretrain.freeze_last_layer_epochs": 0,
                                            "pretrain.koleo_weight": 0.25}),
    "dino_pool1800_e10_koleo0.25": ("dino", {**POOL, "pretrain.epochs": 10, "pretrain.koleo_weight": 0.25}),
    # EsViT (Swin, region loss) with the pool and KoLeo; DINO on a small ResNet
    "esvit_pool1800_e5_koleo0.1": ("esvit", {**POOL, "pretrain.methods": ["esvit"], "pretrain.koleo_weight": 0.1}),
    "dino_resnet10t_pool1800_e3_koleo0.1": ("dino", {**POOL, **RESNET10T, "pretrain.epochs": 3,
                                                     "pretrain.koleo_weight": 0.1}),
    # the shipped default itself under three seeds (pretraining seed; the untrained baseline's weights): the spread
    **{f"default_seed{s}": ("dino", {"pretrain.seed": s}) for s in (0, 1, 2)},
    **{f"random_init_seed{s}": ("random_init", {"embed.seed": s}) for s in (0, 1, 2)},
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
            checkpoint = pretrain(data, folder / "pretrain", method, cfg["pretrain"], model_for(cfg, method),
                                  device="cpu", threads=2, progress=False)
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
    linear = evaluate(embeddings, "linear", cfg["evaluate"], folder / "linear.json")
    result["linear_accuracy"] = linear["metrics"]["accuracy"]
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
