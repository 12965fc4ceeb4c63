"""The extension points, each named once, one module each: ``domains`` and ``sources`` (where raw images come from),
``methods`` (self-supervised methods), ``protocols`` (frozen-embedding evaluations and the label-efficiency ones),
``baselines`` (what trained methods are compared with), and ``stages`` (each stage's entry modules).

The CLI, the Snakemake rules, the config checks and the report read these tables, so adding a source, a method or a
protocol is its module plus one entry here (and its config section in the schema, whose enums a test keeps equal to
these keys). Entries name their code as ``"module:attribute"`` strings, resolved only when a job runs: building the
DAG never imports torch. One module per table keeps code versions precise: a stage's code version covers the tables it
imports, so adding a protocol does not re-run pretraining. This file imports none of them.
"""
from __future__ import annotations

import importlib
from typing import Any


def load(spec: str) -> Any:
    """``"package.module:attribute"`` -> the attribute, imported now."""
    module, _, attribute = spec.partition(":")
    return getattr(importlib.import_module(module), attribute)


def module_of(spec: str) -> str:
    """``"ssl4sci.sources.hub:fetch_vlm4bio"`` -> ``"sources.hub"``: the entry module of a stage's code version."""
    return spec.partition(":")[0].removeprefix("ssl4sci.")
