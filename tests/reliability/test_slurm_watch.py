"""The pending-job watch on squeue text: which reasons never clear, what it says, what it cancels (no cluster needed;
test_slurm_faults.py runs it against a real one)."""
from __future__ import annotations

import io

from ssl4sci.slurm_watch import PendingWatch, explain, partition_nodes, sbatch_comment, slurm_logs, stuck_jobs

SQUEUE = "\n".join([
    "92|rule_simulate|PartitionConfig|cpu|16|2000M|N/A",
    "93|rule_pretrain_wildcards_dino|Resources|gpu|8|8000M|gres/gpu:1",
    "94|rule_embed_wildcards_dino|InvalidAccount|gpu|4|4000M|gres/gpu:1",
    "95|rule_report|Priority|cpu|1|1000M|N/A",
    "garbage line",
])


class FakeSlurm:
    """squeue / sinfo / scancel answering from fixed text, recording every command."""

    def __init__(self, squeue: str, sinfo: str = "2|21694|gpu:1\n"):
        self.squeue, self.sinfo, self.commands = squeue, sinfo, []

    def __call__(self, cmd: list[str]) -> str:
        self.commands.append(cmd)
        return {"squeue": self.squeue, "sinfo": self.sinfo, "scancel": ""}[cmd[0]]


def test_only_reasons_that_never_clear_are_stuck():
    jobs = stuck_jobs(SQUEUE)
    assert [(j.job_id, j.rule, j.reason) for j in jobs] == [("92", "simulate", "PartitionConfig"),
                                                           ("94", "embed", "InvalidAccount")]


def test_the_comment_names_the_job_as_the_slurm_executor_does():
    assert sbatch_comment("report", []) == "rule_report"
    assert sbatch_comment("evaluate", ["dino", "knn"]) == "rule_evaluate_wildcards_dino_knn"
    squeue_line = f"7|{sbatch_comment('evaluate', ['dino', 'knn'])}|PartitionConfig|cpu|2|1M|N/A"
    assert stuck_jobs(squeue_line)[0].rule == "evaluate"


def test_the_explanation_says_what_was_asked_what_is_offered_and_what_to_change():
    job = stuck_jobs(SQUEUE)[0]
    line = explain(job, partition_nodes("cpu", FakeSlurm("")))
    assert "\n" not in line
    assert line.startswith("SLURM job 92 (rule simulate) can never start: PartitionConfig "
                           "(it asks for 16 CPUs, 2000M memory;")
    assert "nodes of partition cpu have at most 2 CPUs, 21694 MB, gres gpu:1" in line and "slurm.max_threads" in line


def test_poll_cancels_each_stuck_job_once_and_a_retry_again():
    slurm, out = FakeSlurm(SQUEUE), io.StringIO()
    watch = PendingWatch("run-1", interval_s=60, run=slurm, out=out)
    assert len(watch.poll()) == 2
    assert ["scancel", "92"] in slurm.commands and ["scancel", "94"] in slurm.commands
    assert ["squeue", "--me", "--noheader", "--states=PENDING", "--format", "%i|%k|%r|%P|%C|%m|%b", "--name",
            "run-1"] in slurm.commands
    assert set(watch.unstartable) == {"rule_simulate", "rule_embed_wildcards_dino"}
    assert watch.poll() == []  # already cancelled: squeue may still list them for a moment
    slurm.squeue = "96|rule_simulate|PartitionConfig|cpu|16|4000M|N/A"  # Snakemake's retry, a new job id
    assert len(watch.poll()) == 1 and ["scancel", "96"] in slurm.commands
    assert out.getvalue().count("(rule simulate) can never start") == 1  # said once, cancelled every time


def test_squeue_failing_is_retried_on_the_next_poll_not_fatal():
    def broken(cmd):
        raise OSError("squeue: command not found")

    assert PendingWatch("run-1", 60, run=broken).poll() == []


def test_the_executors_own_logs_of_a_job_are_found_newest_first(tmp_path):
    import os

    folder = tmp_path / "rule_pretrain" / "esvit"
    folder.mkdir(parents=True)
    for job_id, mtime in (("40", 100), ("41", 200)):
        (folder / f"{job_id}.log").write_text("x")
        os.utime(folder / f"{job_id}.log", (mtime, mtime))
    assert [p.name for p in slurm_logs(tmp_path, sbatch_comment("pretrain", ["esvit"]))] == ["41.log", "40.log"]
    assert slurm_logs(tmp_path, "rule_report") == [] and slurm_logs(None, "rule_report") == []
