"""The extension points, each named once: image sources, pretraining methods, evaluation protocols and baselines.

The CLI, the Snakemake rules, the config checks and the report read these tables, so adding a source, a method or a
protocol is its module plus one entry here (and its config section in the schema, whose enums a test keeps equal to
these keys). Entries name their code as ``"module:attribute"`` strings, resolved only when a job runs: building the
DAG imports this file, never torch.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any

LENSING, PHOTO = "lensing", "photo"


@dataclass(frozen=True)
class Source:
    """Where raw images come from. ``fetch(cfg, out_dir)`` writes ``raw/``; the domain picks the prepare stage (arrays
    for lensing, image files for photos) and the default augmentation."""

    domain: str
    fetch: str
    help: str
    threads: int = 1  # >1: fetch takes ``threads=`` and its rule asks for that many CPUs (capped by slurm.max_threads)
    mem_mb: int = 4000
    runtime_min: int = 60
    extra_raw: tuple[str, ...] = ()  # raw/ files besides the domain's own (images.npy + truth.parquet, or metadata)


SOURCES: dict[str, Source] = {
    "simulate": Source(LENSING, "ssl4sci.sources.lensing_sim:simulate",
                       "simulate strong-lensing images (DeepLense Model I recipe)", threads=16, runtime_min=120,
                       extra_raw=("arc_masks.npy",)),
    "deeplense": Source(LENSING, "ssl4sci.sources.deeplense:read_folder",
                        "read a published DeepLense data set from a local folder", mem_mb=8000),
    "vlm4bio": Source(PHOTO, "ssl4sci.sources.hub:fetch_vlm4bio", "VLM4Bio species photos from the Hugging Face Hub",
                      runtime_min=1440),
    "treeoflife": Source(PHOTO, "ssl4sci.sources.hub:fetch_treeoflife",
                         "TreeOfLife-10M species photos from the Hugging Face Hub", runtime_min=1440),
    "rare_species": Source(PHOTO, "ssl4sci.sources.hub:fetch_rare_species",
                           "Rare Species photos from the Hugging Face Hub", runtime_min=1440),
    "image_folder": Source(PHOTO, "ssl4sci.sources.image_folder:read_image_folder",
                           "a local folder of photos (one sub-folder per class) or a CSV", runtime_min=1440),
}

RAW_LAYOUT: dict[str, tuple[str, ...]] = {LENSING: ("images.npy", "truth.parquet"), PHOTO: ("metadata.parquet",)}
"""What every source of a domain writes in raw/ (the first file is the one prepare reads first), besides
``rejects.parquet`` and ``provenance.json``."""

PREPARE: dict[str, str] = {LENSING: "ssl4sci.prepare:prepare", PHOTO: "ssl4sci.prepare_photos:prepare_photos"}
"""The prepare stage of each domain: ``prepare(raw_dir, out_dir, cfg, *, source=..., threads=...)``."""

METHODS: dict[str, str] = {"dino": "ssl4sci.ssl.dino:DINO", "esvit": "ssl4sci.ssl.esvit:EsViT"}
"""Self-supervised methods: a LightningModule class built as ``cls(cfg, model_cfg, channels, image_size, ...)``."""


@dataclass(frozen=True)
class Protocol:
    """A frozen-embedding evaluation. ``kind``: ``split`` fits on the manifest's splits and scores the score split;
    ``fewshot`` draws its own seeded, stratified split from the labelled rows; ``label_free`` reads no labels, so it
    runs once per method (never per taxonomic rank) and the report gives it its own table."""

    kind: str
    help: str


PROTOCOLS: dict[str, Protocol] = {
    "prototype": Protocol("split", "cosine to class means"),
    "knn": Protocol("split", "DINO's weighted k-NN"),
    "linear": Protocol("split", "logistic regression on standardised features"),
    "prototype_seed": Protocol("fewshot", "cosine to class means on a fixed seeded split (VLM4Bio's protocol)"),
    "simpleshot": Protocol("fewshot", "few-shot nearest centroid on centred, L2-normalised features"),
    "spectrum": Protocol("label_free", "effective rank and spectrum of the embeddings"),
}


def protocols_of(kind: str) -> tuple[str, ...]:
    return tuple(name for name, protocol in PROTOCOLS.items() if protocol.kind == kind)


BASELINE = "random_init"
"""The method name of untrained weights of `model`'s architecture."""

BASELINES: dict[str, str] = {BASELINE: "untrained weights of the `model` architecture"}
"""Baselines every trained method is compared with (config ``embed.baselines``). Two families are derived, not listed:
``random_init_<method>`` (untrained weights of a method's own architecture, :func:`own_baseline`) and
``timm_<name>`` (a public pretrained timm model, config ``embed.timm_baselines``, :func:`timm_method`)."""

PUBLIC_PREFIX = "timm_"


def own_baseline(method: str) -> str:
    """``random_init_<method>``: untrained weights of a trained method's own architecture (when not `model`'s)."""
    return f"{BASELINE}_{method}"


def is_untrained(method: str) -> bool:
    """``random_init`` or a ``random_init_<method>``."""
    return method == BASELINE or method.startswith(BASELINE + "_")


def timm_method(model_name: str) -> str:
    """The method name of a public timm model: ``timm_`` + its name with every run of non-alphanumerics as ``_``."""
    return PUBLIC_PREFIX + re.sub(r"[^A-Za-z0-9]+", "_", model_name).strip("_")


def is_public_pretrained(method: str) -> bool:
    """A ``timm_<name>`` method: weights trained elsewhere, a reference, neither trained nor fine-tuned here."""
    return method.startswith(PUBLIC_PREFIX)


LABEL_EFFICIENCY_PROTOCOLS: tuple[str, ...] = ("linear", "finetune", "regress")
"""How label efficiency uses the labels of each fraction: a linear probe on frozen embeddings, fine-tuning the
backbone, regression of ``finetune.regress_target``."""


STAGES: tuple[str, ...] = ("pretrain", "embed", "evaluate", "finetune", "label_efficiency", "attention", "report")
"""The stages whose entry module is named after them (``ssl4sci.<stage>``); fetch and prepare depend on the source."""


def stage_entries(stage: str, source: str) -> list[str]:
    """The modules a stage's job runs first (``ssl4sci.code_graph`` follows their imports for its code version): the
    stage's own module, the source's fetch or prepare module, and for pretraining every method's module, which it
    loads by name."""
    if stage == "fetch":
        return [module_of(SOURCES[source].fetch)]
    if stage == "prepare":
        return [module_of(PREPARE[SOURCES[source].domain])]
    return [stage, *(map(module_of, METHODS.values()) if stage == "pretrain" else ())]


def stage_modules() -> tuple[str, ...]:
    """Every stage entry module (``sources.hub``, ``prepare``, ...): none of them may import another."""
    fetchers = [module_of(source.fetch) for source in SOURCES.values()]
    return tuple(dict.fromkeys([*fetchers, *map(module_of, PREPARE.values()), *STAGES]))


def load(spec: str) -> Any:
    """``"package.module:attribute"`` -> the attribute, imported now."""
    module, _, attribute = spec.partition(":")
    return getattr(importlib.import_module(module), attribute)


def module_of(spec: str) -> str:
    """``"ssl4sci.sources.hub:fetch_vlm4bio"`` -> ``"sources.hub"``: the entry module of a stage's code version."""
    return spec.partition(":")[0].removeprefix("ssl4sci.")
