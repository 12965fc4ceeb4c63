"""``ssl4sci <stage>``: every pipeline stage from the command line (the Snakemake rules call these).

Stage settings arrive as JSON (the stage's section of the validated config), so a rule's params
carry exactly the settings that, when changed, make Snakemake re-run it.
"""
from __future__ import annotations

import argparse
import json
import sys

from ssl4sci.registry import load
from ssl4sci.registry.domains import LENSING, PHOTO, PREPARE
from ssl4sci.registry.sources import SOURCES


def _json(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"expected JSON, got {text[:60]!r} ({exc})") from exc


def _add_common(p: argparse.ArgumentParser, *, model: bool = False, device: bool = False) -> None:
    p.add_argument("--cfg", type=_json, required=True, help="the stage's config section as JSON")
    p.add_argument("--threads", type=int, default=1)
    if model:
        p.add_argument("--model", type=_json, required=True, help="the model config section as JSON")
    if device:
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssl4sci", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)

    p = sub.add_parser("validate-config", help="check a config file against the schema and print it with defaults")
    p.add_argument("configfile")

    sub.add_parser("config-docs", help="print the Markdown reference of every config key (config/README.md)")

    sources = "; ".join(f"{name}: {source.help}" for name, source in SOURCES.items())
    p = sub.add_parser("fetch", help=f"write a source's raw images into raw/ ({sources})")
    _add_common(p)
    p.add_argument("--source", required=True, choices=list(SOURCES))
    p.add_argument("--out", required=True, help="raw/ folder to write")

    p = sub.add_parser("prepare", help="crop, resize, split and shard raw images")
    _add_common(p)
    p.add_argument("--raw", required=True)
    p.add_argument("--out", required=True, help="data/ folder to write")
    p.add_argument("--source", required=True, choices=list(SOURCES), help="the source that wrote raw/")

    for stage in ("pretrain", "embed", "finetune", "attention"):
        p = sub.add_parser(stage, help=f"{stage} stage")
        _add_common(p, model=True, device=True)
        p.add_argument("--data", required=True, help="prepared data/ folder")
        p.add_argument("--method", required=True)
        p.add_argument("--out", required=True)
        if stage != "pretrain":
            p.add_argument("--checkpoint", default=None, help="pretrain checkpoint (not for baselines)")
        if stage == "embed":
            p.add_argument("--timm", type=_json, default=None,
                           help='a public timm model: {"name": ..., "weights": ...}')
        if stage == "finetune":
            p.add_argument("--task", required=True)
            p.add_argument("--domain", required=True, choices=[LENSING, PHOTO], help="pretrain.augment.domain")

    p = sub.add_parser("label-efficiency", help="linear probe and fine-tuning at 1/10/100 %% of the train labels")
    _add_common(p, model=True, device=True)
    p.add_argument("--data", required=True, help="prepared data/ folder")
    p.add_argument("--method", required=True)
    p.add_argument("--checkpoint", default=None, help="pretrain checkpoint (not for baselines)")
    p.add_argument("--embeddings", default=None, help="the method's embeddings parquet (for the linear probe)")
    p.add_argument("--regress-target", required=True, help="finetune.regress_target")
    p.add_argument("--regress-label", required=True, help="finetune.regress_label")
    p.add_argument("--domain", required=True, choices=[LENSING, PHOTO], help="pretrain.augment.domain")
    p.add_argument("--out", required=True)

    p = sub.add_parser("evaluate", help="evaluate one embedding file with one protocol")
    _add_common(p)
    p.add_argument("--embeddings", required=True)
    p.add_argument("--protocol", required=True)
    p.add_argument("--rank", default=None, help="taxonomic rank column to use as the label (default: label)")
    p.add_argument("--out", required=True)

    p = sub.add_parser("report", help="build report.html, summary.md and summary.json")
    p.add_argument("--inputs", type=_json, required=True, help="JSON: {kind: [paths]}")
    p.add_argument("--experiment", required=True)
    p.add_argument("--config", type=_json, default=None)
    p.add_argument("--html", required=True)
    p.add_argument("--md", required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--failures", default=None,
                   help="failures.json of a partly failed run: build the report from the inputs that exist "
                        "and list the failures")
    return parser


def run(args: argparse.Namespace) -> None:
    stage = args.stage
    if stage == "validate-config":
        from ssl4sci.config import load_config

        print(json.dumps(load_config(args.configfile), indent=2))
    elif stage == "config-docs":
        from ssl4sci.config import schema_markdown

        print(schema_markdown(), end="")
    elif stage == "fetch":
        source = SOURCES[args.source]
        load(source.fetch)(args.cfg, args.out, **({"threads": args.threads} if source.threads > 1 else {}))
    elif stage == "prepare":
        prepare = load(PREPARE[SOURCES[args.source].domain])
        prepare(args.raw, args.out, args.cfg, source=args.source, threads=args.threads)
    elif stage == "pretrain":
        from ssl4sci.pretrain import pretrain

        pretrain(args.data, args.out, args.method, args.cfg, args.model, args.device, args.threads,
                 progress=not args.no_progress)
    elif stage == "embed":
        from ssl4sci.embed import embed

        embed(args.data, args.out, args.method, args.checkpoint, args.cfg, args.model, args.device, args.threads,
              timm=args.timm)
    elif stage == "finetune":
        from ssl4sci.finetune import finetune

        finetune(args.data, args.out, args.method, args.checkpoint, args.task, args.cfg, args.model, args.device,
                 args.threads, domain=args.domain, progress=not args.no_progress)
    elif stage == "label-efficiency":
        from ssl4sci.label_efficiency import label_efficiency

        label_efficiency(args.data, args.embeddings, args.out, args.method, args.checkpoint, args.cfg, args.model,
                         regress_target=args.regress_target, regress_label=args.regress_label, domain=args.domain,
                         device=args.device, threads=args.threads)
    elif stage == "attention":
        from ssl4sci.attention import attention

        attention(args.data, args.out, args.method, args.checkpoint, args.cfg, args.model, args.device, args.threads)
    elif stage == "evaluate":
        from ssl4sci.evaluate import evaluate

        evaluate(args.embeddings, args.protocol, dict(args.cfg, rank=args.rank), args.out)
    elif stage == "report":
        from ssl4sci.failures import read_failures
        from ssl4sci.report import build_report

        failures = read_failures(args.failures)
        if args.failures and failures is None:
            raise FileNotFoundError(f"--failures {args.failures}: no such file")
        build_report(args.inputs, args.experiment, args.html, args.md, args.json, cfg=args.config, failures=failures)


def _announce(stage: str) -> None:
    """One log line saying where the stage runs: host, SLURM job and partition, visible GPUs."""
    import os
    import socket

    env = os.environ
    print(
        f"ssl4sci {stage}: host={socket.gethostname()} slurm_job_id={env.get('SLURM_JOB_ID', '-')} "
        f"slurm_partition={env.get('SLURM_JOB_PARTITION', '-')} "
        f"CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '-')}",
        file=sys.stderr,
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    from ssl4sci.ssl.guard import TrainingCollapsed

    args = build_parser().parse_args(argv)
    if args.stage not in ("validate-config", "config-docs"):
        _announce(args.stage)
    try:
        run(args)
    except (ValueError, FileNotFoundError, FloatingPointError, TrainingCollapsed) as exc:
        # One line a user can act on; the traceback is noise for bad input and for a stopped training run.
        print(f"ssl4sci {args.stage}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        import os

        from ssl4sci.io import DISK_FULL_ERRNOS

        if exc.errno not in DISK_FULL_ERRNOS:
            raise
        # The writers delete their partial files, so freeing space and running again is all it takes.
        where = f" while writing {exc.filename}" if exc.filename else ""
        print(f"ssl4sci {args.stage}: error: {os.strerror(exc.errno).lower()}{where}; free some space and run again",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
