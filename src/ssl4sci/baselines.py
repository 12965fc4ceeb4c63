"""Public pretrained backbones as baselines: any timm model by name, weights from a local file or the Hub.

A baseline is embedded exactly like an ssl4sci checkpoint, so users can compare
their self-supervised model with a public one (e.g. DINOv2's
``vit_small_patch14_dinov2.lvd142m``).  Two things differ from our own models:

* **weights** come from a local ``.safetensors`` / ``.pth`` / ``.bin`` file or, when
  ``weights`` is None, from timm's pretrained source (the Hugging Face Hub, through
  ``huggingface_hub``'s cache: offline runs work once the weights are cached).
  Loading goes through timm's own pretrained loader, so the position embeddings are
  resampled to ``img_size`` and an RGB stem is adapted to ``in_chans`` (summed over
  RGB for 1 channel, repeated cyclically and rescaled for more than 3).
* **input normalisation**: the public model expects its own mean/std (ImageNet's for
  most timm models), not our dataset statistics.  The embed stage must therefore
  feed ``(raw - mean) / std`` with :func:`baseline_normalisation`'s values, ``raw``
  being the image in [0, 1] *before* our normalisation
  (:meth:`ssl4sci.data.PreparedData.raw_image`).
"""
from __future__ import annotations

import difflib
import logging
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from ssl4sci.io import file_sha256

METHOD_PREFIX = "timm:"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


class BaselineError(ValueError):
    """A baseline could not be built; the message is one line naming the model."""


def _one_line(exc: BaseException) -> str:
    """The exception's first line; a line ending in ':' gets its first detail appended."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[0]
    if text.endswith(":") and len(lines) > 1:
        text = f"{text} {lines[1]}"
    return f"{type(exc).__name__}: {text[:300]}"


class _LoadReport(logging.Handler):
    """Collects timm's 'Missing keys' / 'Unexpected keys' messages of load_pretrained."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.missing: list[str] = []
        self.unexpected: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        for prefix, bucket in (("Missing keys (", self.missing), ("Unexpected keys (", self.unexpected)):
            if msg.startswith(prefix):
                bucket.extend(k.strip() for k in msg[len(prefix) :].split(")", 1)[0].split(","))


def _hub_unreachable(exc: BaseException) -> bool:
    """True for 'weights not in the local cache and the Hub cannot be reached' errors."""
    try:
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        LocalEntryNotFoundError = OfflineModeIsEnabled = ()  # type: ignore[assignment]
    import urllib.error

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled, urllib.error.URLError, ConnectionError,
                          TimeoutError)):
            return True
        e = e.__cause__ or e.__context__
    return False


_OPTIONAL_KWARGS = ("img_size", "weight_init")


def _create(timm, name: str, kwargs: dict[str, Any]) -> nn.Module:
    """timm.create_model, retried without the optional keywords an architecture does not take.

    ``img_size`` (ViT-like models) and ``weight_init='skip'`` (timm ViTs: no random init of
    weights that the pretrained load overwrites at once; any tensor left missing is an error).
    """
    kwargs = dict(kwargs)
    while True:
        try:
            return timm.create_model(name, **kwargs)
        except TypeError as exc:
            drop = [k for k in _OPTIONAL_KWARGS if k in kwargs and repr(k) in str(exc)]
            if not drop:
                raise
            for k in drop:
                kwargs.pop(k)


def _hub_provenance(model: nn.Module) -> tuple[str, str]:
    """(weights source, sha256 of the cached weight file or the hub id) after a Hub load."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        repo, _, revision = str(hub_id).partition("@")
        try:
            from huggingface_hub import try_to_load_from_cache

            names = [cfg.get("hf_hub_filename"), "model.safetensors", "pytorch_model.bin",
                     "open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
            for fname in [n for n in names if n]:
                found = try_to_load_from_cache(repo, fname, revision=revision or None)
                if isinstance(found, str) and Path(found).is_file():
                    return f"hf-hub:{hub_id}/{fname}", file_sha256(Path(found))
        except Exception:  # provenance only: never fail a load because the cache layout is unusual
            pass
        return f"hf-hub:{hub_id}", f"hf-hub:{hub_id}"
    url = cfg.get("url")
    return (f"url:{url}", f"url:{url}") if url else ("timm", "timm pretrained (unknown source)")


def load_timm_baseline(name: str, weights: str | None, in_chans: int, img_size: int) -> tuple[nn.Module, dict]:
    """Build timm model ``name`` (``num_classes=0``: forward returns the pooled feature) with pretrained weights.

    ``name``: a timm model name, optionally with a pretrained tag (``vit_small_patch14_dinov2.lvd142m``);
    a leading ``timm:`` is accepted.  ``weights``: a local ``.safetensors``/``.pth``/``.bin`` file
    (a plain state dict, or a checkpoint holding one under ``state_dict``/``model``), or None for
    timm's pretrained weights from the Hub / the local Hugging Face cache.  ``img_size`` is passed
    to architectures that take it (ViTs: position embeddings are resampled), ``in_chans`` always.

    Returns ``(model in eval mode, provenance)`` with provenance keys ``method``
    (``timm:<name>``), ``model``, ``checkpoint_sha256`` (sha256 of the weight file; for a Hub
    load the cached file's sha256 when it can be located, else ``hf-hub:<repo>``), ``weights``
    (where they came from), ``mean``/``std`` (the input normalisation, comma-separated) and
    ``pretrained_input_size``.  Raises :class:`BaselineError` (a ValueError) with a one-line
    message for an unknown name, a missing/unreadable/mismatched weight file, or Hub weights
    that are neither cached nor reachable.
    """
    import timm

    name = _checked_name(timm, str(name))
    kwargs: dict[str, Any] = {
        "pretrained": True,
        "num_classes": 0,
        "in_chans": int(in_chans),
        "img_size": int(img_size),
        "weight_init": "skip",
    }
    if weights:
        kwargs["pretrained_cfg_overlay"] = {"file": str(_checked_weights_file(name, weights))}
    model, report = _create_with_report(timm, name, kwargs, weights)
    _check_loaded_keys(name, weights, report)
    return model.eval(), _provenance(model, name, weights)


def _checked_name(timm, name: str) -> str:
    """``name`` without a leading ``timm:``, once timm knows its architecture and (if given) its pretrained tag."""
    if name.startswith(METHOD_PREFIX):
        name = name[len(METHOD_PREFIX) :]
    arch = name.split(".", 1)[0]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise BaselineError(f"timm model {name!r}: unknown to timm {timm.__version__}{hint}")
    tags = timm.list_pretrained(f"{arch}.*")
    if "." in name and name not in tags:
        raise BaselineError(
            f"timm model {name!r}: no such pretrained tag; available: {', '.join(tags) if tags else 'none'}"
        )
    return name


def _checked_weights_file(name: str, weights: str) -> Path:
    """The local weights file, once it exists and has a suffix timm's loader reads."""
    wpath = Path(weights).expanduser()
    if not wpath.is_file():
        raise BaselineError(f"timm model {name!r}: weights file {wpath} not found")
    if wpath.suffix.lower() not in WEIGHT_SUFFIXES:
        raise BaselineError(
            f"timm model {name!r}: weights file {wpath} has suffix {wpath.suffix!r}, "
            f"expected one of {', '.join(WEIGHT_SUFFIXES)}"
        )
    return wpath


def _create_with_report(timm, name: str, kwargs: dict[str, Any], weights: str | None) -> tuple[nn.Module, _LoadReport]:
    """The model (see :func:`_create`) and timm's missing/unexpected keys of the weight load; any failure becomes
    a one-line :class:`BaselineError`."""
    report = _LoadReport()
    logger = logging.getLogger("timm.models._builder")
    old_level = logger.level
    logger.addHandler(report)
    logger.setLevel(logging.INFO)
    try:
        model = _create(timm, name, kwargs)
    except Exception as exc:
        if not weights and _hub_unreachable(exc):
            raise BaselineError(
                f"timm model {name}: no weights cached and the Hub is unreachable; "
                f"set embed.timm_baselines[..].weights to a local file"
            ) from exc
        if isinstance(exc, RuntimeError) and "No pretrained weights exist" in str(exc):
            raise BaselineError(
                f"timm model {name!r}: timm knows no pretrained weights for it; give a local weights file"
            ) from exc
        source = f"weights file {weights}" if weights else "pretrained weights"
        raise BaselineError(f"timm model {name!r}: could not load {source} ({_one_line(exc)})") from exc
    finally:
        logger.removeHandler(report)
        logger.setLevel(old_level)
    return model, report


def _check_loaded_keys(name: str, weights: str | None, report: _LoadReport) -> None:
    """Missing keys are an error (part of the model would keep random weights); unused ones a warning."""
    if report.missing:
        shown = ", ".join(report.missing[:3]) + (", ..." if len(report.missing) > 3 else "")
        raise BaselineError(
            f"timm model {name!r}: {'weights file ' + str(weights) if weights else 'pretrained weights'} "
            f"do not match the architecture ({len(report.missing)} missing keys: {shown})"
        )
    if report.unexpected:
        warnings.warn(
            f"timm model {name!r}: {len(report.unexpected)} unused keys in the weights "
            f"({', '.join(report.unexpected[:3])})",
            stacklevel=3,  # the caller of load_timm_baseline
        )


def _provenance(model: nn.Module, name: str, weights: str | None) -> dict[str, str]:
    """Where the weights came from, their sha256 and the input normalisation the model expects."""
    if weights:
        source, sha = f"file:{Path(weights).expanduser()}", file_sha256(Path(weights).expanduser())
    else:
        source, sha = _hub_provenance(model)
    mean, std = baseline_normalisation(model)
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    return {
        "method": f"{METHOD_PREFIX}{name}",
        "model": name,
        "checkpoint_sha256": sha,
        "weights": source,
        "mean": ",".join(f"{v:.6g}" for v in mean),
        "std": ",".join(f"{v:.6g}" for v in std),
        "pretrained_input_size": "x".join(str(v) for v in cfg.get("input_size", ())) or "unknown",
    }


def _model_in_chans(model: nn.Module) -> int | None:
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    first = cfg.get("first_conv")
    names = [first] if isinstance(first, str) else list(first or [])
    for n in names:
        try:
            conv = model.get_submodule(n)
        except AttributeError:
            continue
        if hasattr(conv, "in_channels"):
            return int(conv.in_channels)
    return None


def baseline_normalisation(model: nn.Module,
                           in_chans: int | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel ``(mean, std)`` the pretrained model expects for inputs in [0, 1].

    From timm's data config of the model (``resolve_data_config``, i.e. ``model.pretrained_cfg``).
    When the model has a different number of input channels than the pretrained statistics
    (``in_chans`` or the stem's input channels): 1 channel gets the average of the RGB
    statistics (timm sums the RGB stem weights, so a grey image acts as R = G = B; exact when
    the RGB statistics are equal, close for ImageNet's), more channels repeat them cyclically
    like timm's stem adaptation does.
    """
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    mean = [float(v) for v in cfg["mean"]]
    std = [float(v) for v in cfg["std"]]
    n = in_chans if in_chans is not None else _model_in_chans(model) or len(mean)
    if n != len(mean):
        if n == 1:
            mean, std = [sum(mean) / len(mean)], [sum(std) / len(std)]
        else:
            mean = [mean[i % len(mean)] for i in range(n)]
            std = [std[i % len(std)] for i in range(n)]
    return tuple(mean), tuple(std)
