"""Image domains: what a source's raw/ holds, which prepare stage reads it, and which augmentations are
label-preserving (``ssl.augment.DOMAIN_SYMMETRIES``)."""
from __future__ import annotations

LENSING, PHOTO = "lensing", "photo"

RAW_LAYOUT: dict[str, tuple[str, ...]] = {LENSING: ("images.npy", "truth.parquet"), PHOTO: ("metadata.parquet",)}
"""What every source of a domain writes in raw/ (the first file is the one prepare reads first), besides
``rejects.parquet`` and ``provenance.json``."""

PREPARE: dict[str, str] = {LENSING: "ssl4sci.prepare:prepare", PHOTO: "ssl4sci.prepare_photos:prepare_photos"}
"""The prepare stage of each domain: ``prepare(raw_dir, out_dir, cfg, *, source=..., threads=...)``."""
