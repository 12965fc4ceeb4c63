"""Each stage's entry modules: the start of its code version (``ssl4sci.code_graph``) and the modules no other
stage may import."""
from __future__ import annotations

from ssl4sci.registry import module_of
from ssl4sci.registry.domains import PREPARE
from ssl4sci.registry.methods import METHODS
from ssl4sci.registry.sources import SOURCES

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
