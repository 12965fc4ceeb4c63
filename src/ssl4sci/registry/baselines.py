"""What every trained method is compared with, and how their method names are formed."""
from __future__ import annotations

import re

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
