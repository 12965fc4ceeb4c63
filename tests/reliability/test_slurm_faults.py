"""Faults under `--profile profiles/slurm` on a real SLURM cluster (scripts/slurm-test-cluster.sh: one 2-CPU node).

A job that can never start is cancelled and explained instead of waited on; a method whose job dies keeps the others'
results and a report of what finished, exactly as locally.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import deeplense_config, deeplense_folder, env_with_cli, snakemake_command

pytestmark = pytest.mark.e2e


def snakemake_slurm(workdir: Path, configfile: Path) -> list[str]:
    return snakemake_command(workdir, configfile, "--slurm-init-seconds-before-status-checks", "2", profile="slurm")


def slurm_state(comment: str) -> list[tuple[str, str]]:
    """(job id, state) of every job whose comment (Snakemake's rule_<rule>_wildcards_<values>) matches."""
    out = subprocess.run(["squeue", "--states=all", "--noheader", "--format", "%i|%k|%T"], capture_output=True,
                         text=True, check=True).stdout
    jobs = [(f[0], f[2]) for f in (line.strip().split("|") for line in out.splitlines()) if f[1] == comment]
    return sorted(jobs, key=lambda job: int(job[0].split("_")[0]))


def test_a_job_asking_more_cpus_than_a_node_has_is_cancelled_and_explained(cluster, tmp_path):
    """Without slurm.max_threads the fetch job (the simulator) asks for 16 CPUs of a 2-CPU node: it would pend
    forever."""
    config = {"experiment": "stuck", "device": "cpu", "simulate": {"n_per_class": 4, "image_size": 32},
              "prepare": {"image_size": 32}, "model": {"patch_size": 8}, "pretrain": {"global_crop_size": 32,
                                                                                        "local_crop_size": 16},
              "slurm": {"max_threads": None, "pending_check_seconds": 2}}
    configfile = tmp_path / "stuck.yaml"
    configfile.write_text(yaml.safe_dump(config))
    t0 = time.monotonic()
    proc = subprocess.run(snakemake_slurm(tmp_path, configfile), capture_output=True, text=True, env=env_with_cli(),
                          cwd=tmp_path, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert time.monotonic() - t0 < 240, "the run waited on a job that can never start"
    assert "(rule fetch) can never start: PartitionConfig (it asks for 16 CPUs" in out, out[-3000:]
    assert "nodes of partition cpu have at most 2 CPUs" in out and "slurm.max_threads" in out
    assert slurm_state("rule_fetch")[-1][1] == "CANCELLED"

    record = json.loads((tmp_path / "results" / "stuck" / "failures.json").read_text())
    assert [f["rule"] for f in record["failed"]] == ["fetch"]
    assert "can never start: PartitionConfig" in record["failed"][0]["reason"]
    assert {e["rule"] for e in record["not_run"]} >= {"prepare", "pretrain", "embed"}
    assert "Incomplete run: 1 job(s) failed" in (tmp_path / "results" / "stuck" / "report.incomplete.html").read_text()


def test_a_cancelled_method_keeps_the_others_through_slurm(cluster, tmp_path):
    config = deeplense_config(deeplense_folder(tmp_path / "model_i"))
    configfile = tmp_path / "dl.yaml"
    configfile.write_text(yaml.safe_dump(config))
    log = open(tmp_path / "snakemake.out", "w")  # a file, not a pipe: a pipe nobody reads fills up and blocks the run
    proc = subprocess.Popen(snakemake_slurm(tmp_path, configfile), stdout=log, stderr=subprocess.STDOUT,
                            env=env_with_cli(), cwd=tmp_path)
    cancelled: set[str] = set()
    while proc.poll() is None:
        # Every attempt (the profile retries a failed job twice), as a node failing under it again and again would.
        for job, state in slurm_state("rule_pretrain_wildcards_esvit"):
            if state == "RUNNING" and job not in cancelled:
                subprocess.run(["scancel", job], check=True)
                cancelled.add(job)
        time.sleep(0.5)
    proc.wait(timeout=900)
    log.close()
    output = (tmp_path / "snakemake.out").read_text()
    assert cancelled, "the EsViT pretraining job never ran"
    assert proc.returncode != 0, output[-3000:]
    assert "FAILED pretrain[method=esvit]" in output and "(log: results/dl/logs/pretrain_esvit.log)" in output

    res = tmp_path / "results" / "dl"
    record = json.loads((res / "failures.json").read_text())
    assert [(f["rule"], f["wildcards"]) for f in record["failed"]] == [("pretrain", {"method": "esvit"})]
    summary = json.loads((res / "summary.incomplete.json").read_text())
    assert "esvit" not in summary and summary["dino"]["linear"]["accuracy"] >= 0
    assert "pretrain[method=esvit]" in (res / "report.incomplete.html").read_text()
