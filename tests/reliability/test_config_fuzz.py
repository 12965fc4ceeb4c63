"""Bad configs fail before any job, in one line naming the key: the shipped configs, mutated at random.

Every mutation (a key dropped or added, a value replaced by one of another type, a number pushed out of its
range, a path that does not exist) must end in one of two ways: ``validate_config`` accepts the config, or it
raises ``ConfigError`` whose message is one line starting ``config key '<key>'``. Anything else (a TypeError
from a YAML key that is not a string, NaN slipping through a minimum) is a bug the user would meet as a
traceback, or hours later in a job.
"""
from __future__ import annotations

import copy
import datetime
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ssl4sci.cli import main
from ssl4sci.config import SCHEMA_PATH, ConfigError, validate_config

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = {p.name: yaml.safe_load(p.read_text()) or {} for p in sorted((ROOT / "config").glob("*.yaml"))}
SHIPPED["{}"] = {}
SCHEMA = yaml.safe_load(SCHEMA_PATH.read_text())
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MESSAGE = re.compile(r"config key '(?P<key>.+?)': \S")
MISSING = "/nonexistent/ssl4sci-fuzz"


def _key_paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path (list items by index) of a filled-in config."""
    found = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, value in items:
        found.append(prefix + (key,))
        found += _key_paths(value, prefix + (key,))
    return found


FILLED = {name: validate_config(copy.deepcopy(cfg)) for name, cfg in SHIPPED.items()}
KEY_PATHS = sorted({p for cfg in FILLED.values() for p in _key_paths(cfg)}, key=lambda p: tuple(map(str, p)))


def _subschema(path: tuple) -> dict | None:
    """The schema of the value at ``path``; `pretrain.esvit.model` takes `model`'s keys."""
    node = SCHEMA
    for i, key in enumerate(path):
        if path[:i] == ("pretrain", "esvit", "model"):
            node = SCHEMA["properties"]["model"]
        if isinstance(key, int):
            node = node.get("items")
        else:
            node = node.get("properties", {}).get(key)
        if node is None:
            return None
    return node


NUMERIC_KEYS = [p for p in KEY_PATHS if (s := _subschema(p)) is not None
                and set(s) & {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}]


def _json_type_allowed(value: Any, declared: str | list[str]) -> bool:
    kinds = {declared} if isinstance(declared, str) else set(declared)
    if value is None:
        return "null" in kinds
    if isinstance(value, bool):
        return "boolean" in kinds
    if isinstance(value, int):
        return bool(kinds & {"integer", "number"})
    if isinstance(value, float):
        return "number" in kinds and math.isfinite(value)
    kind = {str: "string", list: "array", dict: "object"}.get(type(value))
    return kind in kinds


def _key_text(path: tuple) -> str:
    return ".".join(map(str, path))


def _related(named: str, path: tuple) -> bool:
    """The named key is the mutated one, inside it, or one of its parents (a section or list that holds it)."""
    joined = _key_text(path)
    return named == joined or named.startswith(joined + ".") or joined.startswith(named + ".")


def _names_a_schema_key(named: str) -> bool:
    parts = tuple(int(p) if p.isdigit() else p for p in named.split("."))
    return _subschema(parts) is not None


def _place(cfg: dict, filled: dict, path: tuple) -> tuple[Any, Any] | None:
    """The container of ``path`` in ``cfg``, created from the filled-in config where the raw one leaves it out."""
    node, full = cfg, filled
    for key in path[:-1]:
        if isinstance(full, dict) and key not in full:
            return None  # a key path of another shipped config
        if isinstance(node, dict) and key not in node:
            node[key] = copy.deepcopy(full[key])
        if not isinstance(node, (dict, list)) or (isinstance(node, list) and key >= len(node)):
            return None
        node, full = node[key], full[key]
    if isinstance(node, list) and path[-1] >= len(node):
        return None
    return (node, path[-1]) if isinstance(node, (dict, list)) else None


def _outcome(cfg: dict) -> tuple[dict | None, str | None]:
    """Accepted config or the ConfigError message; any other exception fails the test."""
    try:
        return validate_config(cfg), None
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message and "\r" not in message, message
        assert MESSAGE.match(message), message
        return None, message


def _accepted_is_usable(config: dict) -> None:
    """The rules pass each section to the stages as JSON, and every job validates the config again."""
    assert json.loads(json.dumps(config, allow_nan=False)) == config
    assert validate_config(copy.deepcopy(config)) == config


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.dates(),
    st.sampled_from([0, -1, 1, 5.0, 0.5, "", "auto", "dino", MISSING]),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.one_of(st.text(max_size=6), st.integers(0, 3), st.none()), inner, max_size=3)), max_leaves=6)
# Keys a user might type: misspellings, YAML numbers and nulls, never dots or quotes (the key path separators).
unknown_keys = st.one_of(st.from_regex(r"[A-Za-z_][A-Za-z0-9_ -]{0,10}", fullmatch=True), st.integers(0, 99), st.none())


@FUZZ
@given(base=st.sampled_from(sorted(SHIPPED)), path=st.sampled_from(KEY_PATHS), value=values,
       mutation=st.sampled_from(["drop", "add", "replace"]), unknown=unknown_keys,
       source=st.one_of(st.none(), st.sampled_from(SCHEMA["properties"]["source"]["enum"])))
def test_any_mutation_is_accepted_or_named_in_one_line(base, path, value, mutation, unknown, source):
    cfg = copy.deepcopy(SHIPPED[base])
    if source is not None:
        cfg["source"] = source
    place = _place(cfg, FILLED[base], path)
    assume(place is not None)
    node, leaf = place
    if mutation == "drop":
        assume(isinstance(node, dict) and leaf in node)
        del node[leaf]
    elif mutation == "add":
        target = node.get(leaf) if isinstance(node, dict) else node[leaf]
        assume(isinstance(target, dict) and unknown not in target)
        target[unknown] = value
        path = path + (unknown,)
    else:
        node[leaf] = value
    config, message = _outcome(cfg)
    if message is None:
        _accepted_is_usable(config)
        return
    named = MESSAGE.match(message)["key"]
    assert _related(named, path) or _names_a_schema_key(named), f"{message!r} after a {mutation} at {path}"
    schema = _subschema(path)
    wrong_type = schema is not None and "type" in schema and not _json_type_allowed(value, schema["type"])
    if mutation == "replace" and wrong_type:
        assert named == _key_text(path) and f"got {value!r}" in message, message
    if mutation == "add" and (_subschema(path[:-1]) or {}).get("additionalProperties") is False:
        assert named == _key_text(path) and "unknown key (allowed here:" in message, message


def _out_of_range(schema: dict, bound: str, delta: float) -> float:
    """A number beyond ``bound`` by ``delta`` (the bound itself for an exclusive one), an integer for integer keys."""
    below = bound in ("minimum", "exclusiveMinimum")
    if bound.startswith("exclusive") and delta == 1:
        value = schema[bound]
    else:
        value = schema[bound] + (-delta if below else delta)
    integer = "integer" in ([schema["type"]] if isinstance(schema["type"], str) else schema["type"])
    return (math.floor(value) if below else math.ceil(value)) if integer else value


@FUZZ
@given(base=st.sampled_from(sorted(SHIPPED)), path=st.sampled_from(NUMERIC_KEYS), data=st.data(),
       delta=st.one_of(st.integers(1, 10**9), st.floats(1e-3, 1e9)))
def test_out_of_range_numbers_name_the_key_and_the_bound(base, path, data, delta):
    schema = _subschema(path)
    bounds = [b for b in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum") if b in schema]
    bound = data.draw(st.sampled_from(bounds))
    value = _out_of_range(schema, bound, delta)
    cfg = copy.deepcopy(SHIPPED[base])
    place = _place(cfg, FILLED[base], path)
    assume(place is not None)
    node, leaf = place
    node[leaf] = value
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    message = str(err.value)
    assert message.startswith(f"config key '{_key_text(path)}': expected ") and f"got {value!r}" in message
    assert "\n" not in message


SOURCE_PATH_KEYS = [("deeplense", "path"), ("deeplense", "unlabelled_path"), ("image_folder", "path"),
                    ("image_folder", "csv"), ("image_folder", "unlabelled_path"), ("vlm4bio", "local_path"),
                    ("treeoflife", "local_path"), ("rare_species", "local_path")]


@settings(max_examples=60, deadline=None)
@given(where=st.sampled_from(SOURCE_PATH_KEYS), name=st.from_regex(r"[A-Za-z0-9_.-]{1,12}", fullmatch=True),
       relative=st.booleans())
def test_paths_that_do_not_exist_are_named_before_any_job(where, name, relative):
    source, key = where
    missing = f"no-such-folder/{name}" if relative else f"{MISSING}/{name}"
    section = {key: missing}
    if source == "image_folder" and key == "unlabelled_path":
        section["path"] = str(ROOT)  # image_folder needs path or csv; the pool folder is the missing one
    if source == "deeplense" and key == "unlabelled_path":
        section["path"] = str(ROOT)
    with pytest.raises(ConfigError) as err:
        validate_config({"source": source, source: section})
    message = str(err.value)
    assert message.startswith(f"config key '{source}.{key}': {missing!r} does not exist")
    assert ("(relative to " in message) == relative and "; expected " in message and "\n" not in message


def test_paths_of_other_sources_are_not_checked():
    """Only the chosen source's files are read; a stale path in another section must not block a run."""
    cfg = validate_config({"source": "simulate", "deeplense": {"path": MISSING}, "vlm4bio": {"local_path": MISSING}})
    assert cfg["deeplense"]["path"] == MISSING


def test_existing_paths_are_accepted(tmp_path):
    (tmp_path / "photos.csv").write_text("path,label\n")
    (tmp_path / "w.pth").write_bytes(b"")
    cfg = validate_config({"source": "image_folder", "image_folder": {"csv": str(tmp_path / "photos.csv")},
                           "embed": {"timm_baselines": [{"name": "resnet18", "weights": str(tmp_path / "w.pth")}]}})
    assert cfg["image_folder"]["csv"] == str(tmp_path / "photos.csv")


# The documented cases: what a user sees for each kind of mistake (docs/reliability.md copies this table).
CASES = [
    ({"pretrain": {"epoch": 5}}, "config key 'pretrain.epoch': unknown key (allowed here: augment, base_lr,"),
    ({"pretrain": {"epochs": "ten"}}, "config key 'pretrain.epochs': expected integer, got 'ten'"),
    ({"pretrain": {"epochs": 5.0}}, "config key 'pretrain.epochs': expected integer, got 5.0"),
    ({"simulate": {"halo_mass": float("nan")}}, "config key 'simulate.halo_mass': expected a finite number, got nan"),
    ({"simulate": {"H0": float("inf")}}, "config key 'simulate.H0': expected a finite number, got inf"),
    ({"pretrain": {"momentum_teacher": 1.5}}, "config key 'pretrain.momentum_teacher': expected <= 1, got 1.5"),
    ({"evaluate": {"topk": [1, "3"]}}, "config key 'evaluate.topk.1': expected integer, got '3'"),
    ({"experiment": "my run"}, "config key 'experiment': expected text matching ^[A-Za-z0-9_.-]+$, got 'my run'"),
    ({"experiment": datetime.date(2024, 1, 1)},
     "config key 'experiment': expected string, got datetime.date(2024, 1, 1)"),
    ({"model": {"depth": "six"}}, "config key 'model.depth': expected integer or null, got 'six'"),
    ({"pretrain": {1: 2}}, "config key 'pretrain.1': unknown key (allowed here: augment,"),
    ({"pretrain": {None: 2, "zz": 1}}, "config key 'pretrain.None': unknown key (allowed here: augment,"),
    ({"pretrain": {"bad\nkey": 2}}, "config key 'pretrain.'bad\\nkey'': unknown key (allowed here: augment,"),
    ({"pretrain": {"esvit": {"model": {"patch_size": "4"}}}},
     "config key 'pretrain.esvit.model.patch_size': expected integer, got '4'"),
    ({"pretrain": {"esvit": {"model": {"patch_size": 0}}}},
     "config key 'pretrain.esvit.model.patch_size': expected >= 1, got 0"),
    ({"source": "deeplense", "deeplense": {"path": f"{MISSING}/model_i"}},
     f"config key 'deeplense.path': '{MISSING}/model_i' does not exist; expected the folder of a DeepLense data set, "
     "with one sub-folder per class"),
    ({"source": "image_folder"}, "config key 'image_folder.path': expected exactly one of image_folder.path and "
                                 "image_folder.csv, got path=None and csv=None"),
    ({"embed": {"timm_baselines": [{"name": "vit_small_patch14_dinov2.lvd142m",
                                    "weights": f"{MISSING}/w.safetensors"}]}},
     f"config key 'embed.timm_baselines.0.weights': '{MISSING}/w.safetensors' does not exist; expected null or a local "
     ".safetensors/.pth file"),
]


@pytest.mark.parametrize(("config", "message"), CASES, ids=[c[1].split(":")[0][12:-1] for c in CASES])
def test_documented_messages(config, message):
    with pytest.raises(ConfigError) as err:
        validate_config(copy.deepcopy(config))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_yaml_written_by_hand_fails_in_one_line_on_the_command_line(tmp_path, capsys):
    """YAML reads `.nan`, `1:` and `null:` as a float and non-string keys: the CLI still prints one line."""
    for text, message in [
        ("pretrain:\n  base_lr: .nan\n", "config key 'pretrain.base_lr': expected a finite number, got nan"),
        ("prepare:\n  1: true\n", "config key 'prepare.1': unknown key (allowed here: crop,"),
        ("simulate:\n  null: 3\n  seed: 1\n", "config key 'simulate.None': unknown key (allowed here: H0,"),
        ("device: [cpu]\n", "config key 'device': expected string, got ['cpu']"),
    ]:
        path = tmp_path / "bad.yaml"
        path.write_text(text)
        assert main(["validate-config", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"ssl4sci validate-config: error: {message}") and err.count("\n") == 1, err
