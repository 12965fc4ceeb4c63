#!/usr/bin/env python
"""Print how fast the content-aware multi-crop makes views, and how often it rejects a box.

    python benchmarks/crop_throughput.py [results/lensing_default/data] [--images 320] [--batch 32]

On prepared data (default: the embedded lensing default's data/ folder), one process:
- images/s and views/s of MultiCrop with the config's lensing set (2 global + N local views per image), cut a
  batch at a time on one CPU thread, and the share of candidate boxes rejected (the `crop_reject_rate` of
  metrics.csv);
- the same with rejection off, so the cost of the signal map and the box scoring is visible;
- box scoring: the summed-area-table lookup for `max_tries` boxes at once against summing the mask box by box.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from ssl4sci.config import load_config  # noqa: E402
from ssl4sci.data import ImageDataset, PreparedData  # noqa: E402
from ssl4sci.ssl.augment import MultiCrop  # noqa: E402
from ssl4sci.ssl.crops import SignalMap, sample_boxes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def views_per_second(data: PreparedData, pretrain_cfg: dict, n_images: int,
                     batch: int) -> tuple[float, float, float]:
    crop = MultiCrop(pretrain_cfg, data.stats["mean"], data.stats["std"], pretrain_cfg["augment"]["domain"])
    images = ImageDataset(data, data.rows(["train"]).head(n_images), raw=True)  # MultiCrop takes raw pixels
    raw = torch.stack([images[i][0] for i in range(len(images))])
    torch.manual_seed(0)
    start, views, rejects = time.perf_counter(), 0, 0
    for first in range(0, len(raw), batch):
        out = crop(raw[first:first + batch])
        views += int(out["crops"].sum())
        rejects += int(out["crop_rejects"].sum())
    elapsed = time.perf_counter() - start
    return len(raw) / elapsed, views / elapsed, rejects / (rejects + views)


def box_scoring(data: PreparedData, tries: int, repeats: int = 2000) -> tuple[float, float]:
    raw = data.raw_image(int(data.manifest["shard"].iloc[0]), int(data.manifest["index"].iloc[0]))
    signal = SignalMap.from_image(raw, 3.0)
    h, w = signal.shape
    boxes = sample_boxes(tries, h, w, (0.1, 0.4))
    start = time.perf_counter()
    for _ in range(repeats):
        signal.fractions(boxes)
    vectorised = (time.perf_counter() - start) / repeats
    mask = signal.mask
    start = time.perf_counter()
    for _ in range(repeats // 10):
        [float(mask[top:top + bh, left:left + bw].float().mean()) for top, left, bh, bw in boxes.tolist()]
    loop = (time.perf_counter() - start) / (repeats // 10)
    return vectorised * 1e6, loop * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", nargs="?", default=str(ROOT / "results" / "lensing_default" / "data"))
    parser.add_argument("--config", default=str(ROOT / "config" / "config.yaml"))
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--batch", type=int, default=None, help="images per call (default: pretrain.batch_size)")
    args = parser.parse_args()
    if not (Path(args.data) / "manifest.parquet").exists():
        print(f"{args.data}: no prepared data; run the pipeline up to prepare first (snakemake prepare)",
              file=sys.stderr)
        return 1
    torch.set_num_threads(1)
    data = PreparedData(args.data)
    cfg = load_config(args.config)["pretrain"]
    n_views = 2 + cfg["local_crops_number"]
    print(f"{args.data}: {data.image_size} px, {data.channels} channel(s); {n_views} views per image "
          f"({cfg['global_crop_size']} px global, {cfg['local_crop_size']} px local), augment {cfg['augment']}")
    batch = args.batch or cfg["batch_size"]
    img_s, view_s, rate = views_per_second(data, cfg, args.images, batch)
    print(f"content-aware (min_signal_fraction {cfg['augment']['min_signal_fraction']}): "
          f"{img_s:7.1f} images/s, {view_s:7.1f} views/s, rejected boxes {rate:.4f}")
    plain = dict(cfg, augment=dict(cfg["augment"], min_signal_fraction=0.0))
    img_s, view_s, _ = views_per_second(data, plain, args.images, batch)
    print(f"rejection off:                        {img_s:7.1f} images/s, {view_s:7.1f} views/s")
    vec_us, loop_us = box_scoring(data, cfg["augment"]["max_tries"])
    print(f"scoring {cfg['augment']['max_tries']} boxes: summed-area table {vec_us:.1f} us, "
          f"box-by-box loop {loop_us:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
