"""What a partly failed run lost, and why: the record the report renders and the console summary.

Snakemake runs with ``--keep-going`` (both profiles), so one failed job only stops the jobs that need its outputs.
When the run ends with failures, the workflow's ``onerror`` hook (``workflow/rules/outcome.smk``) lists every failed
job with the one line of its log a user should read first, and every job that could not run because of it; this
module turns those into ``failures.json``, which ``ssl4sci report --failures`` renders next to whatever finished.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable

from ssl4sci.io import read_json, write_json

FAILURES_FILE = "failures.json"
"""Written beside report.html when a run ends with failures; removed when a later run starts, as is the report of
what finished (:func:`incomplete_path`)."""

_OWN_ERROR = re.compile(r"^ssl4sci [\w-]+: error: ")
# The last line of a Python traceback ("ValueError: ...", "torch.OutOfMemoryError: ..."), or a scheduler's kill notice.
_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Collapsed|Exit)(:|$)")
_KILLED = re.compile(r"(slurmstepd: error:|DUE TO TIME LIMIT|oom[-_ ]kill|Out Of Memory)", re.IGNORECASE)
_ANNOUNCE = re.compile(r"^ssl4sci [\w-]+: host=")  # the first line of every stage's log, not a reason
_TAIL_BYTES = 65536  # the reason is at the end; a training log can be large
KILLED_FROM_OUTSIDE = ("the job ended without an error message: it was killed from outside (out of memory, time limit, "
                       "node failure or a signal)")


def incomplete_path(path: str | os.PathLike) -> str:
    """Where the report of a partly failed run goes: ``report.html`` -> ``report.incomplete.html``."""
    path = Path(path)
    return str(path.with_name(f"{path.stem}.incomplete{path.suffix}"))


def _tail_lines(log: str | os.PathLike) -> list[str]:
    with open(log, "rb") as fh:
        fh.seek(max(0, os.path.getsize(log) - _TAIL_BYTES))
        return [ln.strip() for ln in fh.read().decode("utf-8", "replace").splitlines() if ln.strip()]


def reason_from_log(log: str | os.PathLike | None, *scheduler_logs: str | os.PathLike) -> str:
    """The one line a user should read first about a failed job, from its log and its scheduler's logs.

    In order: the stage's own one-line error (``ssl4sci <stage>: error: ...``), a scheduler's kill notice (SLURM
    writes ``slurmstepd: error: ... DUE TO TIME LIMIT`` to its own log, not the rule's), the last line of a Python
    traceback; a log with none of these belongs to a process killed from outside.
    """
    if not log or not Path(log).is_file():
        return "no log was written: the job did not start or was killed before it began"
    lines = _tail_lines(log)
    extra = [ln for path in scheduler_logs if Path(path).is_file() for ln in _tail_lines(path)]
    for pattern in (_OWN_ERROR, _KILLED, _EXCEPTION):
        for line in [*reversed(lines), *reversed(extra)]:
            if pattern.search(line):
                return line
    lines = [ln for ln in lines if not _ANNOUNCE.match(ln)]
    return KILLED_FROM_OUTSIDE + (f"; the log ends with: {lines[-1][:200]}" if lines else "")


def job_label(rule: str, wildcards: dict[str, Any]) -> str:
    """``pretrain[method=esvit]``: how the record, the console and the report name a job."""
    inner = ",".join(f"{k}={v}" for k, v in wildcards.items())
    return f"{rule}[{inner}]" if inner else rule


def failure_record(failed: Iterable[dict[str, Any]], not_run: Iterable[dict[str, Any]],
                   kept_going: bool = True) -> dict[str, Any]:
    """The content of failures.json; entries sorted so two runs that failed alike write the same file.

    ``kept_going``: Snakemake ran with --keep-going (both profiles do), so a job not run was blocked by a failure;
    without it Snakemake stopped scheduling at the first failure."""
    def key(entry: dict[str, Any]) -> tuple:
        return entry["rule"], job_label(entry["rule"], entry.get("wildcards", {}))

    return {"complete": False, "kept_going": kept_going, "failed": sorted(failed, key=key),
            "not_run": sorted(not_run, key=key)}


def drop_inputs(inputs: dict[str, Any], stale: set[str]) -> dict[str, Any]:
    """A report's ``{kind: path or [paths]}`` without the outputs of jobs that failed or did not run: files there
    are from an earlier run, and the report of what finished must not show them as this run's."""
    kept: dict[str, Any] = {}
    for kind, value in inputs.items():
        if isinstance(value, str):
            kept[kind] = None if value in stale else value
        else:
            kept[kind] = [p for p in value if p not in stale]
    return kept


def write_failures(path: str | os.PathLike, record: dict[str, Any]) -> None:
    write_json(path, record)


def read_failures(path: str | os.PathLike | None) -> dict[str, Any] | None:
    """The record, or None for a complete run; a file that is not a record is a clear error."""
    if path is None or not Path(path).is_file():
        return None
    record = read_json(path)
    if not isinstance(record, dict) or not isinstance(record.get("failed"), list):
        raise ValueError(f"{path}: not a failures record (expected an object with a 'failed' list)")
    record.setdefault("not_run", [])
    return record


def console_summary(record: dict[str, Any], report: str | None) -> list[str]:
    """The lines printed at the end of a run with failures: each failure with its reason and log, then what it cost."""
    if record.get("kept_going", True):
        lines = [f"ssl4sci: {len(record['failed'])} job(s) failed; every job that did not need them finished."]
    else:
        lines = [f"ssl4sci: {len(record['failed'])} job(s) failed, and Snakemake stopped starting jobs at the first "
                 "failure (the profiles pass --keep-going, which finishes every job that does not need a failed one)."]
    for entry in record["failed"]:
        log = f" (log: {entry['log']})" if entry.get("log") else ""
        lines.append(f"  FAILED {job_label(entry['rule'], entry['wildcards'])}: {entry['reason']}{log}")
    blocked = [e for e in record["not_run"] if e.get("blocked_by")]
    if blocked:
        names = ", ".join(job_label(e["rule"], e["wildcards"]) for e in blocked)
        lines.append(f"  not run, because they need a failed job's output: {names}")
    if len(blocked) < len(record["not_run"]):
        lines.append(f"  not started: {len(record['not_run']) - len(blocked)} other job(s)")
    if report:
        lines.append(f"  report of what finished, with these failures: {report}")
    return lines
