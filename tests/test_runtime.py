"""Process set-up of the training stages (ssl4sci.runtime): how SLURM's task count decides who starts the processes."""
import pytest

from ssl4sci.runtime import cluster_plugins, launched_externally, srun_tasks


def test_srun_tasks_reads_slurm_ntasks_except_in_an_interactive_allocation(monkeypatch):
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    assert srun_tasks() is None and not launched_externally(2, 1)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_JOB_NAME", "pretrain")
    assert srun_tasks() == 4 and launched_externally(2, 2)
    assert not launched_externally(1, 1)  # one process: nothing to launch
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")
    assert srun_tasks() is None and not launched_externally(2, 2)


def test_cluster_plugins_refuse_a_task_count_other_than_devices_times_nodes(monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "3")
    monkeypatch.setenv("SLURM_JOB_NAME", "pretrain")
    with pytest.raises(ValueError, match=r"= 2 x 2 = 4 processes, but SLURM runs 3 tasks \(SLURM_NTASKS\)"):
        cluster_plugins(2, 2)
    monkeypatch.delenv("SLURM_NTASKS")
    assert cluster_plugins(2, 2) == []  # outside SLURM: Lightning's own default
