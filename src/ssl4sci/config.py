"""Config validation against the JSON schema, with defaults filled in.

Snakemake's own ``validate`` prints the whole jsonschema report; users need one
line that names the key and what was expected, before any job starts.
"""
from __future__ import annotations

import copy
import functools
import json
import math
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from ssl4sci.registry.baselines import BASELINE, is_public_pretrained, own_baseline
from ssl4sci.registry.domains import LENSING, PHOTO
from ssl4sci.registry.sources import SOURCES

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A config key has a bad value; the message is one line naming the key."""


def _fill_defaults(validator_class):
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    # Copy so that one config's edits never leak into the schema's default.
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def _is_integer(checker, instance: Any) -> bool:
    # Draft 7 takes 5.0 for an integer; the stages then fail on range(5.0), far from the config.
    return isinstance(instance, int) and not isinstance(instance, bool)


def _is_number(checker, instance: Any) -> bool:
    # NaN passes every minimum/maximum comparison, and inf breaks the stages: neither is a setting.
    if isinstance(instance, bool) or not isinstance(instance, (int, float)):
        return False
    return isinstance(instance, int) or math.isfinite(instance)  # an int is finite (isfinite(10**400) overflows)


_Checker = jsonschema.validators.extend(
    jsonschema.Draft7Validator,
    type_checker=jsonschema.Draft7Validator.TYPE_CHECKER.redefine_many({"integer": _is_integer, "number": _is_number}),
)
_Validator = _fill_defaults(_Checker)


@functools.lru_cache(maxsize=4)
def _schema_cached(path: str, mtime_ns: int) -> dict[str, Any]:
    return yaml.safe_load(Path(path).read_text())


def _load_schema(schema_path: str | Path) -> dict[str, Any]:
    """The parsed schema, read again only when the file changes (parsing it takes most of a validation)."""
    path = Path(schema_path).resolve()
    return _schema_cached(str(path), path.stat().st_mtime_ns)


def _key_part(part: Any) -> str:
    text = str(part)
    return text if isinstance(part, (str, int)) and text and text.isprintable() else repr(part)


def _key_of(error: jsonschema.ValidationError, prefix: str = "") -> str:
    path = [_key_part(p) for p in error.absolute_path]
    if error.validator == "additionalProperties":
        # YAML allows keys that are not strings (1:, null:), so compare and sort them as text.
        known = set(error.schema.get("properties", {}))
        extra = sorted((p for p in error.instance if p not in known), key=str)
        path.append(_key_part(extra[0]) if extra else "?")
    return ".".join(([prefix] if prefix else []) + path) or "<top level>"


def _type_names(kinds: str | list[str]) -> str:
    return " or ".join(kinds) if isinstance(kinds, list) else kinds


def _expected(error: jsonschema.ValidationError) -> str:
    v, s = error.validator, error.validator_value
    if v == "additionalProperties":
        allowed = ", ".join(sorted(error.schema.get("properties", {})))
        return f"unknown key (allowed here: {allowed})"
    if v == "type":
        if isinstance(error.instance, float) and not math.isfinite(error.instance) and "number" in s:
            return f"expected a finite number, got {error.instance!r}"
        return f"expected {_type_names(s)}, got {error.instance!r}"
    if v == "enum":
        return f"expected one of {s}, got {error.instance!r}"
    if v in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        op = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}[v]
        return f"expected {op} {s}, got {error.instance!r}"
    if v == "pattern":
        return f"expected text matching {s}, got {error.instance!r}"
    if v == "minLength":
        return f"expected a non-empty string, got {error.instance!r}"
    if v == "required":
        return error.message
    if v in ("minItems", "maxItems"):
        return f"expected a list with {v[:3]} {s} items, got {error.instance!r}"
    return f"{error.message}"


def validate_config(config: dict[str, Any], schema_path: str | Path = SCHEMA_PATH) -> dict[str, Any]:
    """Validate ``config`` in place (defaults filled in) and return it; raise ConfigError on the first problem."""
    schema = _load_schema(schema_path)
    errors = sorted(_Validator(schema).iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        e = errors[0]
        raise ConfigError(f"config key '{_key_of(e)}': {_expected(e)}")
    _check_esvit_model(config, schema)
    _check_cross_keys(config)
    _check_source_paths(config)
    return config


def _check_esvit_model(config: dict[str, Any], schema: dict[str, Any]) -> None:
    """`pretrain.esvit.model` takes any key of `model` with the same types and bounds, but none of its defaults
    (the keys it leaves out come from `model`), so it is checked against `model`'s properties here."""
    model_keys = {"type": "object", "additionalProperties": False,
                  "properties": schema["properties"]["model"]["properties"]}
    errors = sorted(_Checker(model_keys).iter_errors(config["pretrain"]["esvit"]["model"]),
                    key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        e = errors[0]
        raise ConfigError(f"config key '{_key_of(e, 'pretrain.esvit.model')}': {_expected(e)}")


def _check_cross_keys(config: dict[str, Any]) -> None:
    """Constraints a JSON schema cannot express."""
    if config["source"] == "deeplense" and not config["deeplense"]["path"]:
        raise ConfigError("config key 'deeplense.path': expected the folder of a DeepLense data set when source is "
                          "deeplense")
    split = config["prepare"]["split"]
    total = split["train"] + split["val"] + split["test"]
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(f"config key 'prepare.split': fractions must sum to 1, got {total:g}")
    shorter, size = config["prepare"]["resize_shorter"], config["prepare"]["image_size"]
    # only the photo stage resizes the shorter side; null is the ImageNet ratio, always above image_size
    if SOURCES[config["source"]].domain == PHOTO and shorter is not None and shorter < size:
        raise ConfigError(f"config key 'prepare.resize_shorter': expected >= prepare.image_size ({size}), "
                          f"got {shorter}")
    pre = config["pretrain"]
    if pre["local_crop_size"] >= pre["global_crop_size"]:
        raise ConfigError(
            f"config key 'pretrain.local_crop_size': expected < pretrain.global_crop_size "
            f"({pre['global_crop_size']}), got {pre['local_crop_size']}"
        )
    if pre["global_crop_size"] > config["prepare"]["image_size"]:
        raise ConfigError(
            f"config key 'pretrain.global_crop_size': expected <= prepare.image_size "
            f"({config['prepare']['image_size']}), got {pre['global_crop_size']}"
        )
    for method in pre["methods"]:
        if is_cnn_name(model_for(config, method)["name"]):
            continue  # a CNN takes any input size: no patch grid to fit
        key = "pretrain.esvit.model" if method == "esvit" and "patch_size" in pre["esvit"]["model"] else "model"
        patch = model_for(config, method)["patch_size"]
        for crop in ("global_crop_size", "local_crop_size"):
            if pre[crop] % patch:
                raise ConfigError(f"config key 'pretrain.{crop}': expected a multiple of {key}.patch_size ({patch}), "
                                  f"got {pre[crop]}")
        if config["prepare"]["image_size"] % patch:
            raise ConfigError(
                f"config key 'prepare.image_size': expected a multiple of {key}.patch_size ({patch}), "
                f"got {config['prepare']['image_size']}"
            )
    if pre["augment"]["domain"] == "auto":  # resolved here, so every stage and the config hash see the same choice
        pre["augment"]["domain"] = SOURCES[config["source"]].domain
    lensing = pre["augment"]["domain"] == LENSING
    if pre["augment"]["keep_centre"] is None:
        pre["augment"]["keep_centre"] = lensing
    if pre["augment"]["zoom"] is None:
        pre["augment"]["zoom"] = not lensing
    if pre["augment"]["min_signal_fraction"] is None:
        pre["augment"]["min_signal_fraction"] = 0.05 if lensing else 0.0
    known = set(pre["methods"]) | set(config["embed"]["baselines"]) | set(architecture_baselines(config))
    for section in ("finetune", "attention"):
        for method in config[section]["methods"]:
            if method not in known:
                raise ConfigError(
                    f"config key '{section}.methods': '{method}' is neither in pretrain.methods nor a baseline "
                    f"({', '.join(sorted(known))})"
                )
    if config["label_efficiency"]["protocols"] is None:  # resolved here, like the augmentation domain
        photo = SOURCES[config["source"]].domain == PHOTO
        config["label_efficiency"]["protocols"] = ["linear", "finetune"] + ([] if photo else ["regress"])
    for method in config["label_efficiency"]["methods"] or []:
        if method not in known or is_public_pretrained(method):
            raise ConfigError(f"config key 'label_efficiency.methods': '{method}' is neither in pretrain.methods "
                              f"nor an untrained baseline ({', '.join(sorted(known))})")
    for method in config["attention"]["methods"]:
        name = model_for(config, method)["name"]
        if not has_cls_attention(name):
            raise ConfigError(f"config key 'attention.methods': '{method}' is not a ViT ({name}); "
                              "CLS attention maps need a ViT backbone (the report says so for the other methods)")


# The local paths each source reads: key -> (folder or file, what it must hold). Only the chosen source's are checked.
SOURCE_PATHS: dict[str, dict[str, tuple[str, str]]] = {
    "deeplense": {"path": ("folder", "the folder of a DeepLense data set, with one sub-folder per class"),
                  "unlabelled_path": ("folder", "null or a folder of .npy images")},
    "image_folder": {"path": ("folder", "null or a folder with one sub-folder per class"),
                     "csv": ("file", "null or a CSV with path and label columns"),
                     "unlabelled_path": ("folder", "null or a folder of images")},
    **{hub: {"local_path": ("folder", "null or a downloaded copy of the Hub repository")}
       for hub in ("vlm4bio", "treeoflife", "rare_species")},
}


def _path_error(key: str, value: str, kind: str, expected: str) -> ConfigError | None:
    path = Path(value).expanduser()
    if path.is_dir() if kind == "folder" else path.is_file():
        return None
    where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
    found = f"is not a {kind}" if path.exists() else "does not exist"
    return ConfigError(f"config key '{key}': {value!r} {found}{where}; expected {expected}")


def _check_source_paths(config: dict[str, Any]) -> None:
    """Local files the run will read must exist before any job starts (a missing one would fail hours in)."""
    source = config["source"]
    section = config.get(source, {})
    if source == "image_folder" and (section["path"] is None) == (section["csv"] is None):
        raise ConfigError(f"config key 'image_folder.path': expected exactly one of image_folder.path and "
                          f"image_folder.csv, got path={section['path']!r} and csv={section['csv']!r}")
    checks = [(f"{source}.{key}", section[key], kind, expected)
              for key, (kind, expected) in SOURCE_PATHS.get(source, {}).items() if section[key] is not None]
    checks += [(f"embed.timm_baselines.{i}.weights", baseline["weights"], "file",
                "null or a local .safetensors/.pth file")
               for i, baseline in enumerate(config["embed"]["timm_baselines"]) if baseline.get("weights") is not None]
    for key, value, kind, expected in checks:
        error = _path_error(key, value, kind, expected)
        if error is not None:
            raise error


TRANSFORMER_PREFIXES = ("vit_", "vit.", "deit", "swin", "test_vit")
"""Name prefixes of timm's ViT and Swin models. The config checks run when Snakemake reads the workflow, where
importing timm would add seconds to every job; ``models.create_backbone`` checks the built model's class exactly."""


def is_cnn_name(name: str) -> bool:
    """Whether a timm model name is taken as a CNN by the config checks (any name that is not a ViT or Swin)."""
    return not name.lower().startswith(TRANSFORMER_PREFIXES)


def has_cls_attention(name: str) -> bool:
    """Whether a backbone of this timm name has the last-block CLS attention the attention stage reads: ViTs only."""
    return not is_cnn_name(name) and "swin" not in name.lower()


def model_for(config: dict[str, Any], method: str) -> dict[str, Any]:
    """The backbone settings of a method: `model`, with `pretrain.esvit.model` laid over it for EsViT and for
    `random_init_esvit`, the untrained baseline of EsViT's architecture."""
    if method in ("esvit", own_baseline("esvit")):
        return {**config["model"], **config["pretrain"]["esvit"]["model"]}
    return dict(config["model"])


def _architecture(model: dict[str, Any]) -> dict[str, Any]:
    """The model keys that say what the network is (grad_checkpointing says how it trains)."""
    return {k: v for k, v in model.items() if k != "grad_checkpointing"}


def architecture_baselines(config: dict[str, Any]) -> list[str]:
    """`random_init_<method>` for every pretrain method whose backbone is not `model`'s: each trained method
    is compared with untrained weights of its own architecture."""
    return [own_baseline(m) for m in config["pretrain"]["methods"]
            if BASELINE in config["embed"]["baselines"]
            and _architecture(model_for(config, m)) != _architecture(model_for(config, BASELINE))]


def label_efficiency_methods(config: dict[str, Any]) -> list[str]:
    """The methods of the label-efficiency study: `label_efficiency.methods`, or (null) every pretrain method followed
    by the untrained baseline of its own architecture, when that baseline is embedded."""
    chosen = config["label_efficiency"]["methods"]
    if chosen is not None:
        return list(chosen)
    own = set(architecture_baselines(config))
    embedded = set(config["embed"]["baselines"]) | own
    methods: list[str] = []
    for method in config["pretrain"]["methods"]:
        baseline = own_baseline(method) if own_baseline(method) in own else BASELINE
        methods += [m for m in (method, baseline) if m not in methods and (m == method or m in embedded)]
    return methods


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read a YAML config file, apply nested overrides, validate."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file '{path}' does not exist")
    config = yaml.safe_load(path.read_text()) or {}
    if not isinstance(config, dict):
        raise ConfigError(f"config file '{path}': expected a mapping at top level")
    for key, value in (overrides or {}).items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return validate_config(config)


def schema_markdown(schema_path: str | Path = SCHEMA_PATH) -> str:
    """Markdown reference of every config key (type, default, meaning), generated from the schema."""
    schema = yaml.safe_load(Path(schema_path).read_text())
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]

    def walk(node: dict, prefix: str) -> None:
        for name, sub in node.get("properties", {}).items():
            key = f"{prefix}{name}"
            if sub.get("type") == "object" and sub.get("properties"):
                if sub.get("description"):
                    lines.append(f"| **`{key}`** | section | | {sub['description'].strip()} |")
                walk(sub, key + ".")
                continue
            kind = sub.get("type", "")
            kind = " or ".join(kind) if isinstance(kind, list) else kind
            if "enum" in sub:
                kind = " \\| ".join(f"`{v}`" for v in sub["enum"])
            elif kind == "array" and "enum" in sub.get("items", {}):
                kind = "list of " + " \\| ".join(f"`{v}`" for v in sub["items"]["enum"])
            limits = (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"), ("exclusiveMaximum", "<"))
            bounds = [f"{op} {sub[k]}" for k, op in limits if k in sub]
            if bounds:
                kind += " (" + ", ".join(bounds) + ")"
            default = json.dumps(sub.get("default"))
            lines.append(f"| `{key}` | {kind} | `{default}` | {str(sub.get('description', '')).strip()} |")

    walk(schema, "")
    return "\n".join(lines) + "\n"
