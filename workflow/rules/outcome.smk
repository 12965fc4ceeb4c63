# outcome: a run that ends with failures still says what finished, what failed and why.
# Both profiles run with --keep-going, so a failed job (a collapsed method, a NaN, a crash, a SLURM job that can never
# start) only stops the jobs that need its outputs. When the run ends with failures, onerror writes failures.json
# (each failed job's one-line reason and log; what could not run because of it), prints it, and builds the report
# from what finished. Snakemake still exits non-zero. The scheduler's failed set and the DAG are read from
# Snakemake's own objects: nothing else knows which jobs failed.
import subprocess as _subprocess

from ssl4sci.failures import FAILURES_FILE, console_summary, failure_record, incomplete_path, reason_from_log  # noqa: E402
from ssl4sci.failures import drop_inputs, job_label, write_failures  # noqa: E402
from ssl4sci.slurm_watch import PendingWatch, sbatch_comment, slurm_logs  # noqa: E402

FAILURES_PATH = Path(RESULTS) / FAILURES_FILE
_PENDING_WATCHES = []


def _uses_slurm():
    plugin = workflow.executor_plugin
    return plugin is not None and "slurm" in str(plugin.name)


def _slurm_executor():
    return getattr(workflow.scheduler, "_executor", None)


def _start_pending_watch():
    """Cancel and explain this run's SLURM jobs that can never start (the run's jobs are named by its run id)."""
    run_name = getattr(_slurm_executor(), "run_uuid", None)
    if not run_name:  # without it the watch could not tell this run's jobs from the user's others
        print("ssl4sci: no SLURM run id found: jobs that can never start are not watched", file=sys.stderr)
        return
    watch = PendingWatch(run_name, SITE["pending_check_seconds"])
    watch.start()
    _PENDING_WATCHES.append(watch)


def _stop_pending_watches():
    for watch in _PENDING_WATCHES:
        watch.stop()


def _entry(job, reasons=None):
    entry = {"rule": job.rule.name, "wildcards": {k: str(v) for k, v in job.wildcards_dict.items()},
             "log": str(job.log[0]) if job.log else None}
    if reasons is not None:
        comment = sbatch_comment(job.rule.name, job.wildcards_dict.values())
        logdir = getattr(_slurm_executor(), "slurm_logdir", None)
        entry["reason"] = reasons.get(comment) or reason_from_log(entry["log"], *slurm_logs(logdir, comment)[:1])
    return entry


def _failed_ancestors(job, failed):
    seen, stack, found = set(), [job], set()
    while stack:
        for dep in workflow.dag.dependencies.get(stack.pop(), {}):
            if dep in seen:
                continue
            seen.add(dep)
            if dep in failed:
                found.add(dep)  # and not what it needed: those finished
            else:
                stack.append(dep)
    return found


def run_outcome():
    """The failures record of the run that just ended, the report job when it did not run (None otherwise), and the
    outputs of every job that failed or did not run."""
    failed = set(getattr(workflow.scheduler, "failed", ()))
    reasons = {}
    for watch in _PENDING_WATCHES:
        reasons.update(watch.unstartable)
    unfinished = [j for j in workflow.dag.needrun_jobs() if j not in failed and j.output]
    report_job = next((j for j in unfinished if j.rule.name == "report"), None)
    not_run = []
    for job in unfinished:
        if job is report_job:
            continue
        entry = _entry(job)
        entry["blocked_by"] = sorted(job_label(d.rule.name, d.wildcards_dict) for d in _failed_ancestors(job, failed))
        not_run.append(entry)
    record = failure_record([_entry(j, reasons) for j in failed], not_run, workflow.execution_settings.keep_going)
    stale = {str(path) for job in [*failed, *unfinished] for path in job.output}
    return record, report_job, stale


def partial_report(job, stale):
    """The report of what finished, beside where the full one goes (report.incomplete.html, ...): report.html exists
    only for a run that completed, so Snakemake and a user never take a partial report for the real one."""
    for path in job.output:
        Path(path).unlink(missing_ok=True)  # a report of an earlier run, outdated since this run needed a new one
    params, out = job.params, {k: incomplete_path(v) for k, v in job.output.items()}
    inputs = json.dumps(drop_inputs(json.loads(params.inputs), stale))
    cmd = [sys.executable, "-m", "ssl4sci.cli", "report", "--inputs", inputs, "--experiment", params.experiment,
           "--config", params.config, "--html", out["html"], "--md", out["md"], "--json", out["json"],
           "--failures", str(FAILURES_PATH)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p))
    Path(job.log[0]).parent.mkdir(parents=True, exist_ok=True)
    with open(job.log[0], "w") as log:
        status = _subprocess.run(cmd, stdout=log, stderr=_subprocess.STDOUT, env=env).returncode
    if status != 0:
        print(f"ssl4sci: the report of what finished could not be built; see {job.log[0]}", file=sys.stderr)
        return None
    return out["html"]


def remove_run_outcome():
    """A new run starts: the failure record and incomplete report of an earlier run no longer describe anything."""
    FAILURES_PATH.unlink(missing_ok=True)
    for path in REPORT_OUTPUTS.values():
        Path(incomplete_path(path)).unlink(missing_ok=True)


onstart:
    remove_run_outcome()
    if _uses_slurm():
        _start_pending_watch()


onsuccess:
    _stop_pending_watches()


def summarise_failures():
    record, report_job, stale = run_outcome()
    if not record["failed"]:  # Ctrl-C, or the executor itself failed: no job's failure to report
        print("ssl4sci: the run stopped before it finished, with no failed job; run again to go on", file=sys.stderr)
        return
    write_failures(FAILURES_PATH, record)
    report_html = partial_report(report_job, stale) if report_job is not None else None
    print("\n".join(console_summary(record, report_html)), file=sys.stderr, flush=True)


onerror:
    _stop_pending_watches()
    try:
        summarise_failures()
    except Exception as exc:  # never hide the run's own error behind one in its summary
        print(f"ssl4sci: could not summarise the failures ({type(exc).__name__}: {exc}); see the log above",
              file=sys.stderr)
