"""Process set-up shared by the training stages: threads, seeds, Lightning trainer arguments, compilation."""
from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Callable

import torch

from ssl4sci.models import pick_device


def setup_process(threads: int, seed: int) -> None:
    """Threads and seeds for a stage process. Seeds torch, numpy and random without importing
    Lightning (its import alone costs seconds in every short job)."""
    import random

    import numpy as np

    torch.set_num_threads(max(1, threads))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, threads)))
    # What Lightning's seed_everything(workers=True) records: its DataLoader workers seed from these.
    os.environ["PL_GLOBAL_SEED"] = str(seed)
    os.environ["PL_SEED_WORKERS"] = "1"
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # Lightning's advice banners are noise in a pipeline log; real warnings still show.
    logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def trainer_kwargs(device: str, precision: str = "32-true", devices: int = 1, nodes: int = 1) -> dict:
    """Accelerator, precision and (for ``devices * nodes > 1``) DDP settings for pl.Trainer.

    Autocast only on GPU (CPU runs fp32). One process: exactly the single-device Trainer, nothing else.
    Several: DDP over NCCL on GPU, over gloo on CPU (pair with ``plugins=cluster_plugins(devices, nodes)``).
    """
    dev = pick_device(device)
    on_gpu = dev.type == "cuda"
    kwargs = dict(
        accelerator="gpu" if on_gpu else "cpu",
        devices=1,
        precision=precision if on_gpu else "32-true",
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    if devices * nodes > 1:
        from pytorch_lightning.strategies import DDPStrategy

        kwargs.update(devices=devices, num_nodes=nodes,
                      strategy="ddp" if on_gpu else DDPStrategy(process_group_backend="gloo"))
    return kwargs


def srun_tasks() -> int | None:
    """Tasks of the SLURM job step this process runs in (``SLURM_NTASKS``), or None outside SLURM.

    Same rule as Lightning's own SLURM detection: jobs named 'bash' or 'interactive' count as not SLURM
    (an interactive allocation where Lightning launches the processes itself).
    """
    if "SLURM_NTASKS" not in os.environ or os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    return int(os.environ["SLURM_NTASKS"])


def launched_externally(devices: int, nodes: int) -> bool:
    """True when srun started one process per device (SLURM_NTASKS > 1); False when this process is the only
    one or Lightning starts the others itself."""
    return devices * nodes > 1 and (srun_tasks() or 1) > 1


def cluster_plugins(devices: int, nodes: int) -> list:
    """Lightning cluster-environment plugin for ``devices`` processes on each of ``nodes`` nodes.

    * SLURM with several tasks: srun launched one process per task, SLURMEnvironment reads rank and world
      size from SLURM_PROCID/SLURM_NTASKS, which must equal devices * nodes.
    * SLURM with one task: one process -- or, for devices > 1 on one node, Lightning launches the others.
    * No SLURM: Lightning's default (it launches the processes, or reads torchrun's variables).

    Under SLURM its auto-requeue is off: pretraining handles SIGTERM/SIGUSR1 itself (checkpoint, exit).
    """
    world = devices * nodes
    tasks = srun_tasks()
    if tasks is None:
        return []
    from lightning_fabric.plugins.environments import LightningEnvironment, SLURMEnvironment

    if tasks > 1:
        if tasks != world:
            raise ValueError(
                f"config keys 'pretrain.devices' x 'pretrain.nodes' = {devices} x {nodes} = {world} processes, "
                f"but SLURM runs {tasks} tasks (SLURM_NTASKS); submit with --nodes={nodes} "
                f"--ntasks-per-node={devices} and start with srun"
            )
        return [SLURMEnvironment(auto_requeue=False)]
    if world == 1:
        return [SLURMEnvironment(auto_requeue=False)]
    if nodes > 1:
        raise ValueError(
            f"config key 'pretrain.nodes' = {nodes} needs one SLURM task per process (--nodes={nodes} "
            f"--ntasks-per-node={devices}, started with srun), but this job step has 1 task"
        )
    return [LightningEnvironment()]  # one task, several devices: Lightning starts the other processes


def compile_in_place(module: torch.nn.Module, setting: bool | str, warm_up: Callable[[], None], what: str,
                     warn: Callable[[str], None] | None = None) -> bool:
    """``torch.compile`` ``module``'s forward in place (``setting``: true = inductor, or a backend's name; false
    does nothing) and run ``warm_up``, which calls it as training will, so the compilation happens now. True when
    compiled.

    A backend that cannot be set up, or a graph it fails to compile, leaves ``module`` eager, says so in one line
    (``warn``) and returns False: a run asked to be fast must not die for it. Only the bound ``forward`` is replaced,
    so the state dict's keys (what checkpoints hold) stay those of the eager module.
    """
    if setting is False:
        return False
    backend = "inductor" if setting is True else str(setting)
    try:
        module.forward = torch.compile(module.forward, backend=backend)
        warm_up()
    except Exception as exc:  # noqa: BLE001 - any failure of the compiler means: run eagerly
        vars(module).pop("forward", None)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        message = f"warning: {what}: torch.compile (backend {backend!r}) failed, running eagerly: {reason}"
        (warn or (lambda line: print(line, file=sys.stderr, flush=True)))(message[:300])
        return False
    # A graph met later (other shapes, the last epoch's monitor) that fails to compile then runs eagerly.
    torch._dynamo.config.suppress_errors = True
    return True
