"""`--profile profiles/slurm` against a real SLURM cluster (scripts/slurm-test-cluster.sh starts one).

Skips with a reason when no cluster answers; fails instead when REQUIRE_SLURM=1 (set by .ci/run).
"""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml
from conftest import MICRO, env_with_cli, planned_jobs, snakemake_command

CPU_RULES = {"fetch", "prepare", "evaluate", "report"}
GPU_RULES = {"pretrain", "embed", "finetune_classify", "finetune_regress", "label_efficiency", "attention"}


def slurm_jobs_after(first_id: int) -> list[dict]:
    proc = subprocess.run(["squeue", "--states=all", "--noheader", "--format", "%i|%k|%P|%T"], capture_output=True,
                          text=True, check=True)
    jobs = []
    for line in proc.stdout.splitlines():
        job_id, comment, partition, state = line.strip().split("|")
        if int(job_id.split("_")[0]) > first_id:
            rule = re.match(r"rule_(\w+?)(_wildcards_.*)?$", comment)
            jobs.append({"id": int(job_id.split("_")[0]), "rule": rule.group(1) if rule else comment,
                         "partition": partition, "state": state})
    return jobs


def last_job_id() -> int:
    proc = subprocess.run(["squeue", "--states=all", "--noheader", "--format", "%i"], capture_output=True, text=True,
                          check=True)
    ids = [int(x.split("_")[0]) for x in proc.stdout.split()]
    return max(ids, default=0)


def snakemake_slurm(workdir: Path, configfile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = snakemake_command(workdir, configfile, "--slurm-init-seconds-before-status-checks", "2", *args,
                            profile="slurm")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env_with_cli(), cwd=workdir)
    if proc.returncode != 0:
        raise AssertionError(f"snakemake --profile slurm {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def test_micro_dag_runs_as_slurm_jobs_on_the_profile_partitions(cluster, tmp_path):
    config = json.loads(json.dumps(MICRO))
    config["experiment"] = "slurm_micro"
    config["slurm"] = {"max_threads": 1}  # the site setting: the test node has 2 CPUs, one per job lets two share it
    # DINO only: EsViT adds jobs of the same rules, and the local e2e test runs it.
    config["pretrain"]["methods"] = ["dino"]
    config["finetune"]["methods"] = ["dino", "random_init"]
    configfile = tmp_path / "micro.yaml"
    configfile.write_text(yaml.safe_dump(config))
    before = last_job_id()
    snakemake_slurm(tmp_path, configfile)
    res = tmp_path / "results" / "slurm_micro"
    assert (res / "report.html").exists() and json.loads((res / "summary.json").read_text())["dino"]["knn"]["top1"] >= 0

    jobs = slurm_jobs_after(before)
    ran = {j["rule"] for j in jobs}
    assert ran == CPU_RULES | GPU_RULES, f"SLURM jobs seen: {jobs}"
    for job in jobs:
        expected = "gpu" if job["rule"] in GPU_RULES else "cpu"
        assert job["partition"] == expected, job
        assert job["state"] == "COMPLETED", job

    # Each stage logs where it ran: inside a SLURM job, on the partition, GPU rules with a visible GPU.
    for log in (res / "logs").glob("*.log"):
        line = next(text for text in log.read_text().splitlines() if text.startswith("ssl4sci "))
        fields = dict(kv.split("=", 1) for kv in line.split(": ", 1)[1].split())
        assert fields["slurm_job_id"] != "-", log.name
        is_gpu = any(log.stem.startswith(r) for r in ("pretrain", "embed", "finetune", "label_efficiency", "attention"))
        assert fields["slurm_partition"] == ("gpu" if is_gpu else "cpu"), log.name
        assert (fields["CUDA_VISIBLE_DEVICES"] != "-") == is_gpu, (log.name, fields)

    # Only stale stages re-run through SLURM, as locally.
    assert planned_jobs(snakemake_slurm(tmp_path, configfile, "--dry-run")) == {}
    config["pretrain"]["base_lr"] = 0.001
    configfile.write_text(yaml.safe_dump(config))
    jobs = planned_jobs(snakemake_slurm(tmp_path, configfile, "--dry-run"))
    assert "fetch" not in jobs and "prepare" not in jobs and jobs["pretrain"] == 1


def test_site_settings_become_the_sbatch_request(tmp_path):
    """Partition names, account, QoS and the GPU style come from config's slurm section (dry run, no cluster)."""
    config = json.loads(json.dumps(MICRO))
    config["slurm"] = {"cpu_partition": "short", "gpu_partition": "a100q", "account": "lensing", "qos": "high",
                       "gpu_model": "a100", "gpu_request": "gpus"}
    config["pretrain"].update(devices=2, nodes=2)
    configfile = tmp_path / "site.yaml"
    configfile.write_text(yaml.safe_dump(config))
    proc = subprocess.run(snakemake_command(tmp_path, configfile, "--cores", "1", "--dry-run"), capture_output=True,
                          text=True, env=env_with_cli())
    assert proc.returncode == 0, proc.stderr
    blocks = {m.group(1): m.group(2) for m in re.finditer(r"rule (\w+):\n(.*?)(?=\n\[|\n\n|\Z)", proc.stdout, re.S)}
    assert "slurm_partition=short" in blocks["fetch"] and "slurm_account=lensing" in blocks["fetch"]
    assert "slurm_extra=--qos=high" in blocks["report"]
    pretrain = blocks["pretrain"]
    for expected in ("slurm_partition=a100q", "gpu=4", "gpu_model=a100", "nodes=2", "tasks=4", "tasks_per_gpu=1",
                     "mpi=srun"):
        assert expected in pretrain, (expected, pretrain)
    assert "gpu=1" in blocks["embed"] and "tasks=" not in blocks["embed"]
