#!/usr/bin/env python
"""Print how fast the embed stage turns prepared images into embeddings against what the backbone allows, as JSON.

    python benchmarks/embed_throughput.py [--config config/config.yaml] [--data results/<exp>/data]
                                          [--method random_init] [--checkpoint last.ckpt] [--device auto]
    python benchmarks/embed_throughput.py --smoke     # seconds on a CPU: a tiny simulated data set and model

One process, the config's model and embed sections:
- ``ceiling``: the backbone's forward pass (eval, no grad, bf16 autocast on GPU, as the stage runs it) on one batch of
  synthetic images already on the device, repeated;
- ``pipeline``: the stage's own feature extraction (``features.extract_features``) over the prepared train, val and
  test images, from the shards;
- ``data``: the stage's dataset and loader alone, nothing computed.
Also printed: pipeline / ceiling and peak memory (GPU, else RSS). Parquet writing is not timed.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from ssl_throughput import benchmark_parser, config_and_data, peak_memory_mb
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from ssl4sci.config import model_for  # noqa: E402
from ssl4sci.data import LABELLED_SPLITS, ImageDataset, PreparedData  # noqa: E402
from ssl4sci.features import extract_features  # noqa: E402
from ssl4sci.models import load_backbone, pick_device  # noqa: E402
from ssl4sci.runtime import setup_process  # noqa: E402


@torch.no_grad()
def ceiling(backbone: torch.nn.Module, batch: int, channels: int, size: int, device: torch.device,
            repeats: int, warmup: int) -> float:
    images = torch.randn(batch, channels, size, size, device=device)
    backbone = backbone.to(device).eval()
    for i in range(warmup + repeats):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            backbone(images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * repeats / (time.perf_counter() - start)


def measure(config: dict, data_dir: Path, method: str, checkpoint: str | None, device: str, repeats: int,
            warmup: int) -> dict:
    cfg, model_cfg = config["embed"], model_for(config, method)
    setup_process(torch.get_num_threads(), cfg["seed"])
    data = PreparedData(data_dir)
    dev = pick_device(device)
    backbone, _ = load_backbone(method, checkpoint, model_cfg, data.channels, data.image_size, seed=cfg["seed"])
    dataset = ImageDataset(data, data.rows(LABELLED_SPLITS))
    batch = min(cfg["batch_size"], len(dataset))
    top = ceiling(backbone, batch, data.channels, data.image_size, dev, repeats, warmup)
    extract_features(backbone, torch.utils.data.Subset(dataset, range(batch)), batch, dev)  # warm-up
    start = time.perf_counter()
    extract_features(backbone, dataset, batch, dev)
    pipeline = len(dataset) / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in DataLoader(dataset, batch_size=batch, shuffle=False):
        pass
    data_only = len(dataset) / (time.perf_counter() - start)
    return {"method": method, "device": str(dev), "batch_size": batch, "images": len(dataset),
            "image_size": data.image_size, "img_per_s": {"ceiling": top, "pipeline": pipeline, "data": data_only},
            "pipeline_over_ceiling": pipeline / top, "peak_memory_mb": peak_memory_mb(), "compiled": False}


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--method", default="random_init", help="a pretrained method needs --checkpoint")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)
    if args.smoke:
        args.repeats, args.warmup = 3, 1
    with tempfile.TemporaryDirectory() as tmp:
        config, data = config_and_data(args, Path(tmp))
        result = measure(config, data, args.method, args.checkpoint, args.device, args.repeats, args.warmup)
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
