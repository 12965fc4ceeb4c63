import copy
from pathlib import Path

import pytest
import yaml

from ssl4sci.config import ConfigError, load_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


def test_default_config_validates_and_fills_defaults():
    cfg = load_config(ROOT / "config" / "config.yaml")
    assert cfg["experiment"] == "lensing_default"
    assert cfg["prepare"]["split"] == {"train": 0.7, "val": 0.1, "test": 0.2}
    assert cfg["pretrain"]["teacher_temp"] == 0.04  # filled from the schema
    assert set(cfg) >= {"simulate", "prepare", "model", "pretrain", "embed", "evaluate", "finetune", "attention"}


def test_every_shipped_config_validates():
    for path in sorted((ROOT / "config").glob("*.yaml")):
        load_config(path)


@pytest.mark.parametrize(
    "override, key",
    [
        ({"pretrain.epochs": -3}, "pretrain.epochs"),
        ({"pretrain.epochs": "ten"}, "pretrain.epochs"),
        ({"pretrain.bogus": 1}, "pretrain.bogus"),
        ({"prepare.crop": "smart"}, "prepare.crop"),
        ({"prepare.split": {"train": 0.5, "val": 0.1, "test": 0.1}}, "prepare.split"),
        ({"pretrain.local_crop_size": 64}, "pretrain.local_crop_size"),
        ({"finetune.methods": ["mae"]}, "finetune.methods"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_bad_values_name_the_key_in_one_line(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "config" / "config.yaml", overrides=override)
    message = str(err.value)
    assert f"'{key}'" in message
    assert "\n" not in message


def test_defaults_are_not_shared_between_configs():
    a, b = validate_config({}), validate_config({})
    a["pretrain"]["methods"].append("dino")
    assert b["pretrain"]["methods"] == ["dino"]


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
