#!/usr/bin/env python
"""Print how fast the embed stage turns prepared images into embeddings against what the backbone allows, as JSON.

    python benchmarks/embed_throughput.py [--config config/config.yaml] [--data results/<exp>/data]
                                          [--method random_init] [--checkpoint last.ckpt] [--device auto]
                                          [--num-workers N] [--batch-size B] [--compile]
    python benchmarks/embed_throughput.py --smoke     # seconds on a CPU: a tiny simulated data set and model

One process, the config's model and embed sections (batch_size, num_workers, compile; the flags override them):
- ``ceiling``: the stage's forward loop (``features.batched_features``: eval, no grad, bf16 autocast on GPU, the
  compiled backbone when ``embed.compile``) on one batch of normalised images already on the device, repeated;
- ``pipeline``: the stage's own export (``embed.write_embeddings``) of the prepared train, val and test images, from
  the shards to a Parquet file streamed batch by batch (median of the timed runs, after one warm-up run);
- ``data``: the stage's data path alone: its loader (workers, pinned memory), the copy to the device and the
  conversion and normalisation there, no forward (median of the timed runs, after one warm-up run).
Also printed: pipeline / ceiling, the stored dtype and peak memory (GPU, else RSS).
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from ssl_throughput import benchmark_parser, config_and_data, peak_memory_mb

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from ssl4sci.config import model_for  # noqa: E402
from ssl4sci.data import LABELLED_SPLITS, PreparedData  # noqa: E402
from ssl4sci.embed import compile_backbone, stored_batches, write_embeddings  # noqa: E402
from ssl4sci.features import batched_features, device_normaliser  # noqa: E402
from ssl4sci.models import load_backbone, pick_device  # noqa: E402
from ssl4sci.runtime import setup_process  # noqa: E402


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ceiling(backbone: torch.nn.Module, batch: int, channels: int, size: int, device: torch.device, repeats: int,
            warmup: int) -> float:
    images = torch.randn(batch, channels, size, size, device=device)
    for _ in batched_features(backbone, (images for _ in range(warmup)), device):
        pass
    synchronise(device)
    start = time.perf_counter()
    for _ in batched_features(backbone, (images for _ in range(repeats)), device):
        pass  # each batch's features reach the host: the device is done with it
    return batch * repeats / (time.perf_counter() - start)


def data_path(data: PreparedData, rows, cfg: dict, device: torch.device, runs: int) -> float:
    """Images per second of the loader, the copy and the normalisation: median of ``runs`` after one warm-up run."""
    normalise = device_normaliser(data.mean, data.std, device)
    seconds = []
    for run in range(runs + 1):
        start = time.perf_counter()
        for images in stored_batches(data, rows, cfg["batch_size"], cfg["num_workers"], device):
            normalise(images.to(device, non_blocking=True))
        synchronise(device)
        if run:
            seconds.append(time.perf_counter() - start)
    return len(rows) / statistics.median(seconds)


def pipeline(backbone: torch.nn.Module, data: PreparedData, rows, cfg: dict, device: torch.device,
             metadata: dict, runs: int, tmp: Path) -> float:
    """Images per second of the stage's export, shards to Parquet: median of ``runs`` after one warm-up run."""
    seconds = []
    for run in range(runs + 1):
        start = time.perf_counter()
        write_embeddings(tmp / "embeddings.parquet", backbone, data, rows, cfg, device, (data.mean, data.std),
                         metadata, "benchmark")
        if run:
            seconds.append(time.perf_counter() - start)
    return len(rows) / statistics.median(seconds)


def measure(config: dict, data_dir: Path, method: str, checkpoint: str | None, device: str, repeats: int,
            warmup: int, runs: int, tmp: Path) -> dict:
    cfg, model_cfg = config["embed"], model_for(config, method)
    setup_process(torch.get_num_threads(), cfg["seed"])
    data = PreparedData(data_dir)
    dev = pick_device(device)
    backbone, provenance = load_backbone(method, checkpoint, model_cfg, data.channels, data.image_size,
                                         seed=cfg["seed"])
    rows = data.rows(LABELLED_SPLITS)
    batch = min(cfg["batch_size"], len(rows))
    cfg = {**cfg, "batch_size": batch}
    # compiled once, as the stage does, then used by the ceiling and every pipeline run
    compiled = compile_backbone(backbone, cfg["compile"], (batch, data.channels, data.image_size, data.image_size), dev)
    top = ceiling(backbone, batch, data.channels, data.image_size, dev, repeats, warmup)
    exported = pipeline(backbone, data, rows, cfg, dev, provenance, runs, tmp)
    loaded = data_path(data, rows, cfg, dev, runs)
    return {"method": method, "device": str(dev), "batch_size": batch, "num_workers": cfg["num_workers"],
            "images": len(rows), "image_size": data.image_size, "stored_dtype": data.stats["dtype"],
            "img_per_s": {"ceiling": top, "pipeline": exported, "data": loaded},
            "pipeline_over_ceiling": exported / top, "peak_memory_mb": peak_memory_mb(),
            "compiled": compiled}


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--method", default="random_init", help="a pretrained method needs --checkpoint")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--repeats", type=int, default=50, help="timed ceiling batches")
    parser.add_argument("--warmup", type=int, default=5, help="ceiling batches before the clock starts")
    parser.add_argument("--runs", type=int, default=3, help="timed pipeline and data runs (after one warm-up run)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: embed.batch_size")
    parser.add_argument("--num-workers", type=int, default=None, help="default: embed.num_workers")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone (embed.compile)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.repeats, args.warmup, args.runs = 3, 1, 1
    with tempfile.TemporaryDirectory() as tmp:
        config, data = config_and_data(args, Path(tmp))
        overrides = {"batch_size": args.batch_size, "num_workers": args.num_workers, "compile": args.compile or None}
        config["embed"].update({k: v for k, v in overrides.items() if v is not None})
        result = measure(config, data, args.method, args.checkpoint, args.device, args.repeats, args.warmup,
                         args.runs, Path(tmp))
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
