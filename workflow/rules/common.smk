# Shared helpers: config validation (before any job starts), result paths, code versions.
import json
import os
import shlex
import sys
from pathlib import Path

SRC = Path(workflow.basedir) / "src"
sys.path.insert(0, str(SRC))
from ssl4sci.config import ConfigError, architecture_baselines, model_for, validate_config  # noqa: E402
from ssl4sci.config import label_efficiency_methods  # noqa: E402
from ssl4sci.code_graph import code_version as stage_code_version  # noqa: E402
from ssl4sci.registry.baselines import timm_method  # noqa: E402
from ssl4sci.registry.domains import RAW_LAYOUT  # noqa: E402
from ssl4sci.registry.protocols import protocols_of  # noqa: E402
from ssl4sci.registry.sources import SOURCES  # noqa: E402
from ssl4sci.registry.stages import stage_entries  # noqa: E402

try:
    validate_config(config, Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml")
except ConfigError as exc:
    raise WorkflowError(str(exc)) from None

# Jobs call the `ssl4sci` CLI: from an activated or --sdm conda environment first, else from the
# environment Snakemake itself runs in (so `.venv/bin/snakemake` works without activation).
shell.prefix(f'export PATH="$PATH:{os.path.dirname(sys.executable)}"; ')

RESULTS = f"results/{config['experiment']}"
PRETRAIN_METHODS = list(config["pretrain"]["methods"])
TIMM_BASELINES = {timm_method(b["name"]): b for b in config["embed"]["timm_baselines"]}
# random_init_<method>: untrained weights of a trained method's own architecture, when it is not `model`'s.
BASELINES = list(config["embed"]["baselines"]) + architecture_baselines(config) + list(TIMM_BASELINES)
METHODS = PRETRAIN_METHODS + BASELINES
PROTOCOLS = list(config["evaluate"]["protocols"])
RANKS = list(config["evaluate"]["ranks"])
# Protocols that read no labels (spectrum) run once per method, never again at each taxonomic rank.
RANK_PROTOCOLS = [p for p in PROTOCOLS if p not in protocols_of("label_free")]
DEVICE = config["device"]
SOURCE = SOURCES[config["source"]]
RAW_FILES = [*RAW_LAYOUT[SOURCE.domain], *SOURCE.extra_raw, "rejects.parquet", "provenance.json"]
# The prepared data every training and inference stage reads.
DATA = dict(manifest=f"{RESULTS}/data/manifest.parquet", stats=f"{RESULTS}/data/stats.json", shards=f"{RESULTS}/data/shards")
# The figure each fine-tuning task draws (its rule output and a report input).
FINETUNE_FIGURE = {"classify": "roc.png", "regress": "scatter.png"}
LE_METHODS = label_efficiency_methods(config)
REPORT_OUTPUTS = dict(html=f"{RESULTS}/report.html", md=f"{RESULTS}/summary.md", json=f"{RESULTS}/summary.json")

# Snakemake only sees rule text, so a hash of every file a stage's entry modules import (ssl4sci.code_graph follows
# the imports; no hand-kept list to drift) is a param: editing the library re-runs exactly the stages that run the
# edited file. The entry modules of fetch and prepare depend on the source (ssl4sci.registry.stages).
def code_version(stage):
    return stage_code_version([f"ssl4sci.{m}" for m in stage_entries(stage, config["source"])], SRC / "ssl4sci")


def stage_cfg(section, drop=()):
    """The settings of one stage as JSON; keys that only choose *which* jobs run are dropped, so adding a
    method does not re-run the others."""
    return json.dumps({k: v for k, v in config[section].items() if k not in drop}, sort_keys=True)


def model_param(wildcards):
    """The backbone settings of the job's method, as JSON for the CLI."""
    return json.dumps(model_for(config, wildcards.method), sort_keys=True)


def pretrain_cfg(wildcards):
    """pretrain settings of one method: EsViT's own section only reaches EsViT, so editing it leaves DINO alone."""
    drop = ("methods",) + (() if wildcards.method == "esvit" else ("esvit",))
    return stage_cfg("pretrain", drop=drop)


ENV = "../../envs/ssl4sci.yaml"


def folder_of(kind, name):
    """A param holding the folder of a named input/output, so no path prefix is hard-coded twice."""
    return lambda wildcards, input, output: os.path.dirname(getattr(input if kind == "input" else output, name))


def checkpoint_for(wildcards):
    """Baselines need no checkpoint; trained methods need their pretrain checkpoint."""
    if wildcards.method in PRETRAIN_METHODS:
        return f"{RESULTS}/pretrain/{wildcards.method}/last.ckpt"
    return []


def checkpoint_arg(wildcards, input):
    return f"--checkpoint {input.ckpt}" if input.get("ckpt") else ""


def timm_arg(wildcards):
    """A public timm model to embed with, as JSON for the CLI (empty for other methods)."""
    spec = TIMM_BASELINES.get(wildcards.method)
    return f"--timm {shlex.quote(json.dumps(spec, sort_keys=True))}" if spec else ""


wildcard_constraints:
    method="|".join(METHODS),
    protocol="|".join(PROTOCOLS),
    rank="kingdom|phylum|class|order|family|genus|species",


# --- Cluster resources -------------------------------------------------------------------------
# Site settings (partitions, account, QoS, GPU style) come from config["slurm"], so a site changes
# them in its config, never in the rules. Memory and run time grow with each retry (`attempt`).
# Locally these keys are inert except gpu_slots, which profiles/local caps at one GPU job at a time.
SITE = config["slurm"]


def site_threads(wanted):
    """A rule's threads, capped by the site's slurm.max_threads (a job asking for more CPUs than a node has never
    starts)."""
    cap = SITE["max_threads"]
    return min(wanted, cap) if cap else wanted


def _scaled(base):
    return lambda wildcards, attempt: base * attempt


def _site_common(mem_mb, runtime):
    res = dict(mem_mb=_scaled(mem_mb), runtime=_scaled(runtime))
    if SITE["account"]:
        res["slurm_account"] = SITE["account"]
    extra = " ".join(x for x in (f"--qos={SITE['qos']}" if SITE["qos"] else "", SITE["extra"] or "") if x)
    if extra:
        res["slurm_extra"] = extra
    return res


def cpu_resources(mem_mb, runtime):
    return dict(slurm_partition=SITE["cpu_partition"], **_site_common(mem_mb, runtime))


def gpu_resources(mem_mb, runtime, gpus=None, nodes=1):
    """A GPU job: `gpus` per node, one task per GPU when more than one process trains (DDP via srun)."""
    gpus = gpus or SITE["gpus_per_job"]
    res = dict(slurm_partition=SITE["gpu_partition"], gpu_slots=1, **_site_common(mem_mb, runtime))
    model = SITE["gpu_model"]
    if SITE["gpu_request"] == "gres":
        res["gres"] = f"gpu:{model}:{gpus}" if model else f"gpu:{gpus}"
    else:
        res["gpu"] = gpus * nodes
        if model:
            res["gpu_model"] = model
    if gpus * nodes > 1:
        res.update(nodes=nodes, tasks=gpus * nodes, tasks_per_gpu=1, mpi="srun")
    return res


def ddp_launcher(processes):
    """Under SLURM a multi-process job starts one training process per task with srun; elsewhere
    Lightning launches its own processes."""
    if processes <= 1:
        return ""
    return f'$( [ -n "${{SLURM_JOB_ID:-}}" ] && echo "srun --ntasks={processes} --kill-on-bad-exit=1" )'
