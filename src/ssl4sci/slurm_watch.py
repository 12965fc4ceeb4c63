"""SLURM jobs that can never start: found, explained in one line and cancelled, instead of waited on forever.

sbatch accepts a job that asks for more than any node of its partition has (16 CPUs on 2-core nodes, a GPU on a
CPU partition, more memory than a node holds); it then pends with a reason such as ``PartitionConfig`` and Snakemake
waits without a word. While a run uses the SLURM executor, the workflow (``workflow/rules/outcome.smk``) polls
``squeue`` for its own pending jobs; one whose reason can never clear is cancelled, so Snakemake records it as failed,
every job that does not need it goes on (``--keep-going``), and the run's failure summary gives this module's line.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

# Pending reasons that no amount of waiting clears: the request exceeds a partition, QOS or account limit, or names
# something that does not exist. Reasons that do clear (Resources, Priority, Dependency, QOSGrp*, MaxCpuPerAccount,
# and PartitionNodeLimit or ReqNodeNotAvail while nodes are down) are left alone.
NEVER_STARTS = frozenset({
    "PartitionConfig", "PartitionTimeLimit", "BadConstraints", "InvalidAccount", "InvalidQOS",
    "AccountNotAllowed", "QOSMaxCpuPerJobLimit", "QOSMaxGRESPerJob", "QOSMaxMemoryPerJob", "QOSMaxNodePerJobLimit",
    "QOSMaxWallDurationPerJobLimit", "AssocMaxCpuPerJobLimit", "AssocMaxNodePerJobLimit",
    "AssocMaxWallDurationPerJobLimit", "QOSMinGRES",
})
_SQUEUE_FORMAT = "%i|%k|%r|%P|%C|%m|%b"  # id, comment (Snakemake's rule_<name>_wildcards_<values>), reason, request

Runner = Callable[[list[str]], str]


def _run(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60).stdout


def sbatch_comment(rule: str, wildcard_values: Iterable[object]) -> str:
    """The comment Snakemake's SLURM executor gives a job: ``rule_<rule>[_wildcards_<values joined by _>]``."""
    values = "_".join(str(v) for v in wildcard_values).replace("/", "_")
    return f"rule_{rule}" + (f"_wildcards_{values}" if values else "")


def slurm_logs(logdir: str | os.PathLike | None, comment: str) -> list[Path]:
    """The SLURM executor's own logs of a job (``<logdir>/rule_<rule>/<wildcards>/<job id>.log``), newest first:
    where slurmstepd writes why it killed the job."""
    if not logdir:
        return []
    rule, _, values = comment.partition("_wildcards_")
    folder = Path(logdir) / rule / values
    return sorted(folder.glob("*.log"), key=lambda p: p.stat().st_mtime, reverse=True) if folder.is_dir() else []


@dataclass(frozen=True)
class StuckJob:
    job_id: str
    comment: str
    reason: str
    partition: str
    cpus: str
    memory: str
    gres: str

    @property
    def rule(self) -> str:
        """The Snakemake rule, from the comment the SLURM executor sets (``rule_<rule>_wildcards_<values>``)."""
        return self.comment.removeprefix("rule_").split("_wildcards_")[0]


def stuck_jobs(squeue_output: str) -> list[StuckJob]:
    """Pending jobs (``squeue --states=PENDING --format`` :data:`_SQUEUE_FORMAT`) whose reason never clears."""
    jobs = []
    for line in squeue_output.splitlines():
        fields = line.strip().split("|")
        if len(fields) == 7 and fields[2] in NEVER_STARTS:
            jobs.append(StuckJob(*fields))
    return jobs


def partition_nodes(partition: str, run: Runner = _run) -> str:
    """What the largest node of a partition offers, e.g. ``2 CPUs, 7900 MB, gres gpu:1`` ('' when sinfo fails)."""
    try:
        out = run(["sinfo", "--noheader", "--partition", partition, "--format", "%c|%m|%G"])
    except (OSError, subprocess.SubprocessError):
        return ""
    best = max((line.split("|") for line in out.splitlines() if line.count("|") == 2),
               key=lambda f: int(f[0].rstrip("+") or 0) if f[0].rstrip("+").isdigit() else 0, default=None)
    return f"{best[0]} CPUs, {best[1]} MB, gres {best[2]}" if best else ""


def explain(job: StuckJob, nodes: str) -> str:
    """One line: which job, what it asked for, what the partition offers, what to change."""
    asked = f"{job.cpus} CPUs, {job.memory} memory" + (f", {job.gres}" if job.gres not in ("", "N/A", "(null)") else "")
    offers = f"; nodes of partition {job.partition} have at most {nodes}" if nodes else ""
    return (f"SLURM job {job.job_id} (rule {job.rule}) can never start: {job.reason} (it asks for {asked}{offers}). "
            f"Cancelled it. Cap CPUs with slurm.max_threads, or set slurm.cpu_partition / gpu_partition, account and "
            f"qos in the config to what the site allows.")


class PendingWatch(threading.Thread):
    """Polls this run's pending jobs every ``interval_s`` and cancels the ones that can never start.

    ``unstartable`` maps each cancelled job's comment to its one-line explanation, for the run's failure record.
    """

    def __init__(self, run_name: str, interval_s: float, run: Runner = _run, out=sys.stderr):
        super().__init__(name="ssl4sci-slurm-pending-watch", daemon=True)
        self.run_name, self.interval_s, self._run, self._out = run_name, interval_s, run, out
        self.unstartable: dict[str, str] = {}
        self._cancelled: set[str] = set()  # job ids; a retried job comes back under a new id with the same comment
        self._stop_event = threading.Event()

    def poll(self) -> list[str]:
        """One check; returns the explanations of the jobs it cancelled."""
        # Only this run's jobs (the SLURM executor names them by its run id), never the user's others.
        cmd = ["squeue", "--me", "--noheader", "--states=PENDING", "--format", _SQUEUE_FORMAT, "--name", self.run_name]
        try:
            jobs = stuck_jobs(self._run(cmd))
        except (OSError, subprocess.SubprocessError):
            return []  # squeue briefly unavailable: the next poll retries
        lines = []
        for job in jobs:
            if job.job_id in self._cancelled:
                continue
            self._cancelled.add(job.job_id)
            line = explain(job, partition_nodes(job.partition, self._run))
            try:
                self._run(["scancel", job.job_id])
            except (OSError, subprocess.SubprocessError) as exc:
                line += f" (scancel failed: {exc})"
            if job.comment not in self.unstartable:  # a retry of the same job: cancelled again, said once
                print(f"ssl4sci: {line}", file=self._out, flush=True)
            self.unstartable[job.comment] = line
            lines.append(line)
        return lines

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            self.poll()

    def stop(self) -> None:
        """Stop polling and wait for a poll under way, so ``unstartable`` is final."""
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=90)
