"""Throughput of the strong-lensing simulator (images per second).

Prints figures, never pass/fail. For each worker count it times a whole
``simulate()`` call (process start-up, numba compilation, writing the memory-mapped
outputs included) on the embedded default configuration, and, once, the
steady-state rate of ``simulate_one`` per class in this process after a warm-up.

    python benchmarks/simulate_throughput.py                 # default 64x64 at 0.1", 1 and 2 workers
    python benchmarks/simulate_throughput.py --full          # 150x150 at 0.05" (full Model I size)
    python benchmarks/simulate_throughput.py --threads 1 2 4 --n-per-class 100
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
import time

from ssl4sci.config import validate_config
from ssl4sci.sources import lensing_sim as ls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="worker process counts (default 1 2)")
    ap.add_argument("--n-per-class", type=int, default=50, help="images per class per run (default 50)")
    ap.add_argument("--full", action="store_true",
                    help="full Model I size: 150x150 pixels at 0.05 arcsec, vortex length clip 5 arcsec")
    args = ap.parse_args()

    cfg = validate_config({"experiment": "bench"})["simulate"]
    cfg["n_per_class"] = args.n_per_class
    if args.full:
        cfg.update(image_size=150, pixel_scale=0.05, vortex_length_range=[0.05, 5.0])
    n_total = cfg["n_per_class"] * len(cfg["classes"])
    print(f"lensing_sim throughput: {cfg['image_size']}x{cfg['image_size']} px at {cfg['pixel_scale']} arcsec, "
          f"supersampling {cfg['supersampling_factor']}, {n_total} images per run "
          f"({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f} at start)")

    # steady state in this process, per class
    for label in cfg["classes"]:
        ls.simulate_one(cfg, label, 0)  # warm-up: imports, numba compilation
        n = max(20, args.n_per_class)
        t0 = time.perf_counter()
        for i in range(n):
            ls.simulate_one(cfg, label, i + 1)
        dt = time.perf_counter() - t0
        print(f"  simulate_one steady state  {label:7s}: {n / dt:8.1f} images/s  ({1e3 * dt / n:.1f} ms/image)")

    # whole runs
    for threads in args.threads:
        with tempfile.TemporaryDirectory(prefix="ssl4sci-bench-") as tmp:
            cpu0 = _cpu_seconds()
            t0 = time.perf_counter()
            ls.simulate(cfg, tmp, threads=threads, progress=False)
            dt = time.perf_counter() - t0
            cpu = _cpu_seconds() - cpu0
        print(f"  simulate(threads={threads}) end to end : {n_total / dt:8.1f} images/s  ({dt:.1f} s wall, "
              f"{1e3 * cpu / n_total:.1f} CPU-ms/image, load average {os.getloadavg()[0]:.2f} after)")


def _cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished child processes."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        ru = resource.getrusage(who)
        total += ru.ru_utime + ru.ru_stime
    return total


if __name__ == "__main__":
    main()
