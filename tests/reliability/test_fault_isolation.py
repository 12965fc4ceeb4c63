"""One failed method never loses the others' results: the DAG runs on, the report says what failed, the exit status too.

The failing job is a real pretraining job of a real run, killed from outside the way the kernel's OOM killer or a
node failure kills it (SIGKILL): no mocked stage, and the same run then recovers when re-run.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import deeplense_config, deeplense_folder, env_with_cli, snakemake_command

from ssl4sci.failures import KILLED_FROM_OUTSIDE, console_summary, drop_inputs, failure_record, reason_from_log


def snakemake_local(workdir: Path, configfile: Path) -> list[str]:
    """The command a user runs: the local profile (which keeps going past a failed job) on 2 cores."""
    return snakemake_command(workdir, configfile, "--cores", "2", profile="local")


def kill_when_running(proc: subprocess.Popen, pattern: str, timeout_s: float = 600) -> int:
    """SIGKILL every process whose command line matches ``pattern`` once it appears; the number killed."""
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
        pids = [int(p) for p in found if int(p) != os.getpid()]
        if pids:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return len(pids)
        time.sleep(0.05)
    return 0


@pytest.mark.e2e
def test_a_killed_method_leaves_the_others_and_a_report_listing_it(tmp_path):
    folder = deeplense_folder(tmp_path / "model_i")
    configfile = tmp_path / "dl.yaml"
    configfile.write_text(yaml.safe_dump(deeplense_config(folder)))
    res = tmp_path / "results" / "dl"

    log = open(tmp_path / "snakemake.out", "w")  # a file, not a pipe: a pipe nobody reads fills up and blocks the run
    proc = subprocess.Popen(snakemake_local(tmp_path, configfile), stdout=log, stderr=subprocess.STDOUT,
                            env=env_with_cli(), cwd=tmp_path)
    # The Python process, not the shell around it: what the OOM killer picks.
    killed = kill_when_running(proc, r"bin/ssl4sci pretrain .*--method esvit")
    proc.wait(timeout=900)
    log.close()
    output = (tmp_path / "snakemake.out").read_text()
    assert killed, "the EsViT pretraining job never started"

    # The run says it failed, and what and why, at the end of its output.
    assert proc.returncode != 0, output[-3000:]
    tail = output[output.rindex("job(s) failed"):]
    assert f"FAILED pretrain[method=esvit]: {KILLED_FROM_OUTSIDE}" in tail
    assert "(log: results/dl/logs/pretrain_esvit.log)" in tail
    assert "report of what finished, with these failures: results/dl/report.incomplete.html" in tail

    # Everything that did not need EsViT's checkpoint finished: DINO and both untrained baselines, end to end.
    record = json.loads((res / "failures.json").read_text())
    assert [(f["rule"], f["wildcards"]) for f in record["failed"]] == [("pretrain", {"method": "esvit"})]
    assert record["not_run"] and all(e["blocked_by"] == ["pretrain[method=esvit]"] for e in record["not_run"])
    not_run = {(e["rule"], e["wildcards"].get("method")) for e in record["not_run"]}
    assert {("embed", "esvit"), ("label_efficiency", "esvit"), ("finetune_classify", "esvit")} <= not_run
    assert not any(m in ("dino", "random_init", "random_init_esvit") for _, m in not_run)
    summary = json.loads((res / "summary.incomplete.json").read_text())
    assert "esvit" not in summary
    assert summary["dino"]["knn"]["top1"] >= 0 and summary["random_init_esvit"]["linear"]["accuracy"] >= 0
    assert "finetune_classify" in summary["dino"]

    # The report of what finished holds DINO's results and opens with EsViT's failure. It is named for what it is:
    # report.html only ever belongs to a complete run.
    html = (res / "report.incomplete.html").read_text()
    assert "Incomplete run: 1 job(s) failed" in html and "pretrain[method=esvit]" in html
    assert "results/dl/logs/pretrain_esvit.log" in html and "dino" in html
    assert "Incomplete run" in (res / "summary.incomplete.md").read_text()
    assert not any((res / name).exists() for name in ("report.html", "summary.md", "summary.json"))

    # Nothing that looks finished was left by the killed job.
    assert not (res / "pretrain" / "esvit" / "last.ckpt").exists()

    # Re-running re-tries only what failed (and the report), finishes, and removes the failure record.
    rerun = subprocess.run(snakemake_local(tmp_path, configfile), capture_output=True, text=True, env=env_with_cli(),
                           cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    ran = rerun.stdout + rerun.stderr
    assert "rule pretrain:" in ran and "wildcards: method=esvit" in ran and "method=dino" not in ran
    assert not (res / "failures.json").exists() and not (res / "report.incomplete.html").exists()
    assert "esvit" in json.loads((res / "summary.json").read_text())
    assert "Incomplete run" not in (res / "report.html").read_text()


def test_the_reason_is_the_line_a_user_should_read(tmp_path):
    log = tmp_path / "pretrain_esvit.log"
    log.write_text("ssl4sci pretrain: host=n1 slurm_job_id=7 slurm_partition=gpu CUDA_VISIBLE_DEVICES=0\n"
                   "epoch 9: loss 10.99\n"
                   "ssl4sci pretrain: error: training collapsed at epoch 10: view loss 11.08 = ln(65536) +- 0.5 %\n")
    assert reason_from_log(log).startswith("ssl4sci pretrain: error: training collapsed at epoch 10")

    log.write_text("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                   "torch.OutOfMemoryError: CUDA out of memory\n")
    assert reason_from_log(log) == "torch.OutOfMemoryError: CUDA out of memory"

    # SLURM writes its kill notice to its own log, not the rule's
    log.write_text("ssl4sci embed: host=n1\nepoch 3\n")
    slurm_log = tmp_path / "41.log"
    slurm_log.write_text("slurmstepd: error: *** JOB 41 ON n1 CANCELLED AT 2026-12-04T10:00:00 DUE TO TIME LIMIT ***\n")
    assert reason_from_log(log, slurm_log).endswith("DUE TO TIME LIMIT ***")
    assert reason_from_log(log, tmp_path / "absent.log").startswith(KILLED_FROM_OUTSIDE)

    log.write_text("ssl4sci pretrain: host=n1\nepoch 1/5\n")
    assert reason_from_log(log) == f"{KILLED_FROM_OUTSIDE}; the log ends with: epoch 1/5"
    assert reason_from_log(tmp_path / "absent.log").startswith("no log was written")


def test_outputs_of_failed_and_blocked_jobs_never_reach_the_incomplete_report():
    """Files at those paths are from an earlier run: the report of what finished must not pass them off as this
    one's."""
    inputs = {"stats_json": "data/stats.json", "eval_json": ["eval/dino/knn.json", "eval/esvit/knn.json"]}
    assert drop_inputs(inputs, {"eval/esvit/knn.json"}) == {"stats_json": "data/stats.json",
                                                              "eval_json": ["eval/dino/knn.json"]}
    assert drop_inputs(inputs, {"data/stats.json"})["stats_json"] is None


def test_without_keep_going_the_summary_does_not_claim_the_rest_finished():
    record = failure_record([{"rule": "simulate", "wildcards": {}, "log": None, "reason": "x"}],
                            [{"rule": "prepare", "wildcards": {}, "log": None, "blocked_by": []}], kept_going=False)
    lines = console_summary(record, None)
    assert "stopped starting jobs at the first failure" in lines[0] and lines[-1] == "  not started: 1 other job(s)"


def test_the_console_summary_names_each_failure_its_reason_and_log():
    record = failure_record(
        failed=[{"rule": "pretrain", "wildcards": {"method": "esvit"}, "log": "logs/p.log", "reason": "collapsed"}],
        not_run=[{"rule": "embed", "wildcards": {"method": "esvit"}, "log": "logs/e.log",
                  "blocked_by": ["pretrain[method=esvit]"]}])
    lines = console_summary(record, "results/x/report.html")
    assert lines[1] == "  FAILED pretrain[method=esvit]: collapsed (log: logs/p.log)"
    assert "embed[method=esvit]" in lines[2] and lines[3].endswith("results/x/report.html")


def test_the_full_report_refuses_missing_inputs_and_the_incomplete_one_lists_failures(tmp_path, capsys):
    """report.html is only ever built from every input; with --failures the report says what is missing and why."""
    from ssl4sci.cli import main

    missing = tmp_path / "eval" / "esvit" / "knn.json"
    inputs = json.dumps({"eval_json": [str(missing)]})
    out = [f"--{k}={tmp_path / name}" for k, name in (("html", "r.html"), ("md", "s.md"), ("json", "s.json"))]
    assert main(["report", "--inputs", inputs, "--experiment", "x", *out]) == 2
    assert f"report input not found: {missing}" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()

    record = failure_record([{"rule": "pretrain", "wildcards": {"method": "esvit"}, "log": "logs/p.log",
                              "reason": "ssl4sci pretrain: error: training collapsed at epoch 10"}], [])
    (tmp_path / "failures.json").write_text(json.dumps(record))
    assert main(["report", "--inputs", inputs, "--experiment", "x", *out,
                 "--failures", str(tmp_path / "failures.json")]) == 0
    html = (tmp_path / "r.html").read_text()
    assert "Incomplete run: 1 job(s) failed" in html and "training collapsed at epoch 10" in html
    assert "| pretrain[method=esvit] | ssl4sci pretrain: error: training collapsed at epoch 10 | logs/p.log |" in \
        (tmp_path / "s.md").read_text()
