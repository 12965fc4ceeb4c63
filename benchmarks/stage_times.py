#!/usr/bin/env python
"""Print the wall time of each stage of a finished run, from Snakemake's benchmark files.

    python benchmarks/stage_times.py [results/lensing_default]

Each rule declares `benchmark:`, so every job leaves results/<experiment>/benchmarks/<job>.tsv
(wall seconds, max RSS). The total is the sum of job wall times (an upper bound on the
wall time of a run that overlaps jobs) next to the wall time between the first job's start
and the last job's end, from the benchmark files' modification times.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd


def stage_of(job: str) -> str:
    for prefix in ("pretrain", "embed", "evaluate", "finetune", "label_efficiency", "attention"):
        if job.startswith(prefix):
            return prefix
    return job


def main(results: Path) -> int:
    files = sorted((results / "benchmarks").glob("*.tsv"))
    if not files:
        print(f"no benchmark files under {results / 'benchmarks'}; run the pipeline first", file=sys.stderr)
        return 1
    rows = []
    for f in files:
        bench = pd.read_csv(f, sep="\t")
        rows.append({"job": f.stem, "stage": stage_of(f.stem), "wall_s": float(bench["s"].iloc[-1]),
                     "max_rss_mb": float(bench["max_rss"].iloc[-1]) if "max_rss" in bench else float("nan")})
    jobs = pd.DataFrame(rows)
    print(f"Per job ({results}):")
    print(jobs.sort_values("job").to_string(index=False, float_format=lambda v: f"{v:8.1f}"))
    stages = jobs.groupby("stage", sort=False).agg(jobs=("job", "count"), wall_s=("wall_s", "sum"),
                                                    max_rss_mb=("max_rss_mb", "max"))
    order = ["fetch", "prepare", "pretrain", "embed", "evaluate", "finetune", "label_efficiency", "attention", "report"]
    stages = stages.reindex([s for s in order if s in stages.index])
    print("\nPer stage (sum of its jobs):")
    print(stages.to_string(float_format=lambda v: f"{v:8.1f}"))
    # Each benchmark file is written as its job ends: its mtime minus the job's wall time is the start.
    ends = {f.stem: f.stat().st_mtime for f in files}
    starts = [ends[j] - w for j, w in zip(jobs["job"], jobs["wall_s"])]
    print(f"first job start -> last job end: {max(ends.values()) - min(starts):.1f} s "
          "(the run's wall time, Snakemake's own start-up excluded)")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("results/lensing_default")))
