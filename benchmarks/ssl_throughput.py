#!/usr/bin/env python
"""Print how fast the pretraining stage runs against what its training step alone allows, as JSON.

    python benchmarks/ssl_throughput.py [--config config/config.yaml] [--data results/<exp>/data] [--method dino]
                                        [--steps 50] [--warmup 10] [--device auto]
    python benchmarks/ssl_throughput.py --smoke     # seconds on a CPU: a tiny simulated data set and model

One process, one run, the config's pretrain and model sections (method, batch, crops, precision, workers):
- ``ceiling``: the project's training step (the method's LightningModule under the same Trainer settings) on one
  batch of synthetic views already on the device: what the step allows when the data path costs nothing;
- ``pipeline``: the same step fed the way the stage feeds it (``pretrain.training_batches``): the loader from the
  prepared shards, with the views cut in its workers or, on a GPU, on the device after the copy (or from the images
  kept there: ``pretrain.data_on_device``);
- ``data``: that data path alone, batches drawn (and cut on the device where the stage does) and nothing trained.
``--compile`` (default: the config's ``pretrain.compile``) compiles the step for both (``torch.compile``).
Each is timed at every batch end after ``--warmup`` batches (CUDA synchronised there). Also printed: pipeline /
ceiling, the step's FLOPs (``torch.utils.flop_counter``) and achieved TFLOP/s, and peak memory (GPU, else RSS).
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from ssl4sci.config import load_config, model_for, validate_config  # noqa: E402
from ssl4sci.data import PreparedData  # noqa: E402
from ssl4sci.pretrain import method_class, training_batches, training_images  # noqa: E402
from ssl4sci.runtime import setup_process, trainer_kwargs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMOKE = {"simulate": {"n_per_class": 4, "image_size": 32, "pixel_scale": 0.2, "supersampling_factor": 1},
         "prepare": {"image_size": 32, "shard_size": 16, "samples_per_class": 1},
         "model": {"patch_size": 8, "depth": 1},
         "pretrain": {"batch_size": 4, "out_dim": 64, "head_hidden_dim": 32, "head_bottleneck_dim": 16,
                      "global_crop_size": 32, "local_crop_size": 16, "local_crops_number": 2, "num_workers": 0}}


class BatchEndClock(pl.Callback):
    """perf_counter at every batch end (after the step and the EMA), the device synchronised first."""

    def __init__(self):
        self.times: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def images_per_second(times: list[float], warmup: int, batch: int) -> float:
    timed = times[warmup:]
    return batch * (len(timed) - 1) / (timed[-1] - timed[0])


def synthetic_batch(cfg: dict, channels: int, device: torch.device) -> tuple[dict, torch.Tensor]:
    """A collated multi-crop batch of random views on the device: 2 global + ``local_crops_number`` local."""
    b, g, loc = cfg["batch_size"], cfg["global_crop_size"], cfg["local_crop_size"]
    views = [torch.randn(b, channels, g, g, device=device) for _ in range(2)]
    views += [torch.randn(b, channels, loc, loc, device=device) for _ in range(cfg["local_crops_number"])]
    counts = torch.full((b,), len(views), device=device)
    return {"views": views, "crops": counts, "crop_rejects": torch.zeros_like(counts)}, torch.zeros(b, device=device)


class Repeat(torch.utils.data.IterableDataset):
    """The same ready batch ``n`` times (a loader with ``batch_size=None`` passes it through untouched)."""

    def __init__(self, batch, n: int):
        self.batch, self.n = batch, n

    def __iter__(self):
        return (self.batch for _ in range(self.n))


def timed_fit(module: pl.LightningModule, loader, steps: int, device: str, precision: str) -> list[float]:
    clock = BatchEndClock()
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         callbacks=[clock], **trainer_kwargs(device, precision))
    trainer.fit(module, loader)
    return clock.times


def step_flops(module: pl.LightningModule, batch: dict, cfg: dict) -> int:
    """FLOPs of one forward and backward of the method's loss on ``batch`` (the optimiser and EMA not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        module.compute_loss(batch["views"], float(cfg["teacher_temp"])).loss.backward()
    module.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(config: dict, data_dir: Path, method: str, steps: int, warmup: int, device: str,
            compile_step: bool | str | None = None) -> dict:
    cfg = copy.deepcopy(config["pretrain"])
    cfg["guard"]["enabled"] = False  # a few steps say nothing about collapse
    if compile_step is not None:
        cfg["compile"] = compile_step
    model_cfg = model_for(config, method)
    setup_process(torch.get_num_threads(), cfg["seed"])
    data = PreparedData(data_dir)
    rows, counts = training_images(data, cfg, 1)
    batch = min(cfg["batch_size"], len(rows))
    cfg["batch_size"] = batch
    total = warmup + steps

    def module() -> pl.LightningModule:
        return method_class(method)(cfg, model_cfg, data.channels, data.image_size, steps_per_epoch=total,
                                    world_batch=batch, monitor=None, data_counts=counts)

    dev = torch.device("cuda" if torch.cuda.is_available() and device != "cpu" else "cpu")
    ready = synthetic_batch(cfg, data.channels, dev)
    ceiling = images_per_second(timed_fit(module(), torch.utils.data.DataLoader(Repeat(ready, total),
                                                                                batch_size=None),
                                          total, device, cfg["precision"]), warmup, batch)
    # the stage's loader repeats over its epoch; a run shorter than an epoch stops at max_steps
    loader, device_views = training_batches(data, rows, cfg, batch, 1, 0, dev)
    trained = module()
    trained.batch_transform = device_views
    pipeline = images_per_second(timed_fit(trained, loader, total, device, cfg["precision"]), warmup, batch)
    times = []
    for i, raw in enumerate(loader):
        if device_views is not None:
            device_views(raw.to(dev, non_blocking=True))
            if dev.type == "cuda":
                torch.cuda.synchronize()
        times.append(time.perf_counter())
        if i + 1 == min(total, len(loader)):
            break
    data_only = images_per_second(times, min(warmup, len(times) - 2), batch)
    flops = step_flops(module().to(dev), ready[0], cfg)
    return {"method": method, "device": str(dev), "precision": cfg["precision"] if dev.type == "cuda" else "32-true",
            "batch_size": batch, "views": 2 + cfg["local_crops_number"], "steps_timed": steps,
            "img_per_s": {"ceiling": ceiling, "pipeline": pipeline, "data": data_only},
            "pipeline_over_ceiling": pipeline / ceiling, "step_gflop": flops / 1e9,
            "achieved_tflop_per_s": flops * ceiling / batch / 1e12, "peak_memory_mb": peak_memory_mb(),
            "compiled": cfg["compile"], "views_on_device": device_views is not None,
            "data_on_device": device_views is not None and device_views.resident is not None}


def smoke_data(root: Path) -> tuple[dict, Path]:
    """A tiny simulated and prepared data set and a config that trains on it in seconds."""
    from ssl4sci.prepare import prepare
    from ssl4sci.sources.lensing_sim import simulate

    config = validate_config(copy.deepcopy(SMOKE))
    simulate(config["simulate"], root / "raw", threads=1, progress=False)
    prepare(root / "raw", root / "data", config["prepare"], source="simulate")
    return config, root / "data"


def benchmark_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments both throughput benchmarks take: which config and data, the device, smoke mode."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "config" / "config.yaml"))
    parser.add_argument("--data", default=None, help="prepared data/ folder (default: the config's results)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--smoke", action="store_true", help="tiny simulated data and model, a few batches, for a CPU")
    return parser


def config_and_data(args: argparse.Namespace, tmp: Path) -> tuple[dict, Path]:
    """The smoke data set built under ``tmp``, or the config file and its prepared data folder."""
    if args.smoke:
        return smoke_data(tmp)
    config = load_config(args.config)
    return config, Path(args.data or f"results/{config['experiment']}/data")


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--method", default=None, help="default: the config's first pretrain method")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--compile", default=None, help="true, false or a backend (default: the config's)")
    args = parser.parse_args(argv)
    compile_step = {"true": True, "false": False}.get(args.compile, args.compile)
    if args.smoke:
        args.steps, args.warmup = 3, 1
    with tempfile.TemporaryDirectory() as tmp:
        config, data = config_and_data(args, Path(tmp))
        method = args.method or config["pretrain"]["methods"][0]
        print(json.dumps(measure(config, data, method, args.steps, args.warmup, args.device, compile_step), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
