"""The registry is the one list of sources, methods, protocols and baselines: the schema, the CLI, the rules and the
report agree with it, and every entry resolves to real code."""
from __future__ import annotations

import inspect

import pytest
import yaml

from ssl4sci import report
from ssl4sci.cli import build_parser
from ssl4sci.config import SCHEMA_PATH
from ssl4sci.registry import load, module_of
from ssl4sci.registry.baselines import (
    BASELINE,
    BASELINES,
    is_public_pretrained,
    is_untrained,
    own_baseline,
    timm_method,
)
from ssl4sci.registry.domains import LENSING, PHOTO, PREPARE, RAW_LAYOUT
from ssl4sci.registry.methods import METHODS
from ssl4sci.registry.protocols import LABEL_EFFICIENCY_PROTOCOLS, PROTOCOLS, protocols_of
from ssl4sci.registry.sources import SOURCES
from ssl4sci.registry.stages import stage_modules

SCHEMA = yaml.safe_load(SCHEMA_PATH.read_text())["properties"]


def item_enum(section: str, key: str) -> list[str]:
    return SCHEMA[section]["properties"][key]["items"]["enum"]


def test_the_schema_offers_exactly_the_registered_names_in_the_same_order():
    assert SCHEMA["source"]["enum"] == list(SOURCES)
    assert item_enum("pretrain", "methods") == list(METHODS)
    assert item_enum("evaluate", "protocols") == list(PROTOCOLS)
    assert item_enum("embed", "baselines") == list(BASELINES)
    assert item_enum("label_efficiency", "protocols") == list(LABEL_EFFICIENCY_PROTOCOLS)


def test_baseline_names_follow_one_rule():
    assert own_baseline("esvit") == "random_init_esvit" and is_untrained("random_init_esvit")
    assert is_untrained(BASELINE) and not is_untrained("dino")
    assert timm_method("vit_small_patch14_dinov2.lvd142m") == "timm_vit_small_patch14_dinov2_lvd142m"
    assert is_public_pretrained(timm_method("resnet50.a1_in1k")) and not is_public_pretrained("dino")


def test_every_source_has_its_config_section_and_a_known_domain():
    for name, source in SOURCES.items():
        assert name in SCHEMA, f"source {name!r} has no config section (its rule passes config[{name!r}])"
        assert source.domain in RAW_LAYOUT and source.domain in PREPARE
    assert {s.domain for s in SOURCES.values()} == {LENSING, PHOTO}


@pytest.mark.parametrize("name", list(SOURCES))
def test_every_fetch_function_exists_and_takes_the_cli_arguments(name):
    source = SOURCES[name]
    parameters = inspect.signature(load(source.fetch)).parameters
    assert list(parameters)[:2] == ["cfg", "out_dir"]
    assert ("threads" in parameters) == (source.threads > 1)  # the CLI passes threads only then


@pytest.mark.parametrize("domain", list(PREPARE))
def test_every_prepare_function_takes_the_cli_arguments(domain):
    parameters = inspect.signature(load(PREPARE[domain])).parameters
    assert list(parameters)[:3] == ["raw_dir", "out_dir", "cfg"] and {"source", "threads"} <= set(parameters)


def test_every_method_is_a_lightning_module():
    import pytorch_lightning as pl

    for spec in METHODS.values():
        assert issubclass(load(spec), pl.LightningModule)


def test_the_cli_accepts_every_source_and_nothing_else():
    parser = build_parser()
    assert parser.parse_args(["fetch", "--source", "treeoflife", "--cfg", "{}", "--out", "x"]).source == "treeoflife"
    with pytest.raises(SystemExit):
        parser.parse_args(["fetch", "--source", "not_a_source", "--cfg", "{}", "--out", "x"])


def test_protocol_kinds_partition_the_protocols_and_the_report_has_a_table_for_each():
    kinds = ("split", "fewshot", "label_free")
    assert sorted(sum((protocols_of(k) for k in kinds), ())) == sorted(PROTOCOLS)
    assert report.EVAL_PROTOCOLS == protocols_of("split")
    assert protocols_of("label_free") == (report.SPECTRUM,)  # the one label-free table the report draws


def test_stage_modules_are_the_fetchers_the_prepare_stages_and_the_named_stages():
    stages = stage_modules()
    assert module_of("ssl4sci.sources.hub:fetch_vlm4bio") == "sources.hub"
    assert {"sources.lensing_sim", "sources.deeplense", "sources.hub", "sources.image_folder", "prepare",
            "prepare_photos", "pretrain", "evaluate", "report"} <= set(stages)
    assert "registry" not in stages and "cli" not in stages
