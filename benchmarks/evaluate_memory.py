"""Peak memory and time of the chunked prototype, k-NN and SimpleShot protocols as the problem grows.

Each measurement runs in a fresh subprocess: it builds random float32 inputs,
resets the kernel's peak-RSS counter (``/proc/self/clear_refs``), runs the
protocol and reports the growth of the peak resident set above the inputs.
A "naive" column gives the size of the full queries x keys similarity matrix
that an unchunked implementation would hold.  ``simpleshot`` is one fold of one
shot (``--shot`` support images per class, CL2N features, Euclidean nearest centroid):
keys = classes, as for ``prototype``.

    PYTHONPATH=src python benchmarks/evaluate_memory.py            # default sweep
    PYTHONPATH=src python benchmarks/evaluate_memory.py --quick    # smaller sweep
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def worker(protocol: str, n_query: int, n_keys: int, dim: int, chunk: int, k: int) -> dict:
    """One measurement; ``k`` is knn_k for knn and the shot for simpleshot."""
    import torch

    from ssl4sci.fewshot import simpleshot_predict
    from ssl4sci.knn import knn_true_class_rank, prototype_ranks

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    rng = np.random.default_rng(0)
    x_score = rng.standard_normal((n_query, dim), dtype=np.float32)
    if protocol == "prototype":
        n_classes = n_keys
        y_fit = np.repeat(np.arange(n_classes), 2)  # two training items per class
        x_fit = rng.standard_normal((len(y_fit), dim), dtype=np.float32)
    elif protocol == "simpleshot":
        n_classes = n_keys
        y_fit = np.repeat(np.arange(n_classes), k)  # k support images per class
        # one embedding matrix: support rows first, then the queries (gathered by row index)
        emb = np.concatenate([rng.standard_normal((len(y_fit), dim), dtype=np.float32), x_score])
        del x_score
        support_rows = np.arange(len(y_fit))
        query_rows = np.arange(len(y_fit), len(emb))
    else:
        n_classes = 3
        x_fit = rng.standard_normal((n_keys, dim), dtype=np.float32)
        y_fit = rng.integers(0, n_classes, n_keys)
    y_score = rng.integers(0, n_classes, n_query)
    # warm up torch's matmul/topk so one-off allocations are not counted
    if protocol == "simpleshot":
        simpleshot_predict(emb[:16], np.arange(8), np.arange(8) % 2, np.arange(8, 16), 2, 4)
    else:
        prototype_ranks(x_fit[:8], np.arange(8) % 2, x_score[:8], 2, 1, 4)

    reset = _reset_peak()
    base = _status_kib("VmRSS") if reset else _status_kib("VmHWM")
    t0 = time.perf_counter()
    if protocol == "prototype":
        top = prototype_ranks(x_fit, y_fit, x_score, n_classes, 5, chunk)
        acc = float((top[:, 0] == y_score).mean())
    elif protocol == "simpleshot":
        pred = simpleshot_predict(emb, support_rows, y_fit, query_rows, n_classes, chunk)
        acc = float((pred == y_score).mean())
    else:
        rank, _ = knn_true_class_rank(x_fit, y_fit, x_score, y_score, k, 0.07, chunk)
        acc = float((rank == 0).mean())
    elapsed = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    return {"extra_peak_mib": (peak - base) / 1024, "time_s": elapsed, "top1": acc, "peak_reset": reset}


def run_one(protocol: str, n_query: int, n_keys: int, dim: int, chunk: int, k: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", protocol, str(n_query), str(n_keys), str(dim), str(chunk), str(k)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=6, metavar=("PROTOCOL", "NQ", "NK", "D", "CHUNK", "K"), help=argparse.SUPPRESS)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--shot", type=int, default=5, help="SimpleShot support images per class")
    ap.add_argument("--quick", action="store_true", help="smaller sweep (seconds)")
    args = ap.parse_args(argv)
    if args.worker:
        p, nq, nk, d, ch, k = args.worker
        print(json.dumps(worker(p, int(nq), int(nk), int(d), int(ch), int(k))))
        return

    d, ch = args.dim, args.chunk
    if args.quick:
        sweep = [
            ("prototype", 2_000, 200),
            ("prototype", 20_000, 200),
            ("prototype", 20_000, 2_000),
            ("knn", 5_000, 5_000),
            ("knn", 20_000, 5_000),
            ("simpleshot", 20_000, 200),
            ("simpleshot", 20_000, 2_000),
        ]
    else:
        sweep = [
            ("prototype", 2_000, 2_000),
            ("prototype", 20_000, 2_000),
            ("prototype", 100_000, 2_000),
            ("prototype", 20_000, 200),
            ("prototype", 20_000, 20_000),
            ("knn", 2_000, 20_000),
            ("knn", 20_000, 20_000),
            ("knn", 20_000, 60_000),
            ("simpleshot", 20_000, 200),
            ("simpleshot", 20_000, 2_000),
            ("simpleshot", 100_000, 2_000),
            ("simpleshot", 20_000, 20_000),
        ]
    print(f"dim={d} chunk_size={ch} knn_k={args.k} shot={args.shot} "
          f"threads={os.environ.get('BENCH_THREADS', 'torch default')}")
    header = (f"{'protocol':<10}{'queries':>9}{'keys':>9}  {'chunk':>10}{'naive MiB':>11}{'peak+ MiB':>11}"
              f"{'time s':>9}{'top1':>7}")
    print(header)
    print("-" * len(header))
    rows = [(p, nq, nk, ch) for p, nq, nk in sweep]
    # for contrast: the same 20k x 2k prototype and simpleshot problems without chunking
    rows.append(("prototype", 20_000, 2_000, 10**9))
    rows.append(("simpleshot", 20_000, 2_000, 10**9))
    for p, nq, nk, chunk in rows:
        r = run_one(p, nq, nk, d, chunk, args.shot if p == "simpleshot" else args.k)
        naive = nq * nk * 4 / 2**20
        label = "none" if chunk >= max(nq, nk) else str(chunk)
        print(
            f"{p:<10}{nq:>9}{nk:>9}  {label:>10}{naive:>11.0f}{r['extra_peak_mib']:>11.0f}"
            f"{r['time_s']:>9.2f}{r['top1']:>7.3f}"
            + ("" if r["peak_reset"] else "  (peak not reset: upper bound)")
        )
    print("keys = classes for prototype and simpleshot, training items for knn; peak+ = peak RSS above the inputs")


if __name__ == "__main__":
    main()
