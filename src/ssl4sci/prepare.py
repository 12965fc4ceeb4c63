"""Prepare: raw images -> cropped, resized, split, normalised-statistics shards.

Reads the uniform raw layout every source writes (``images.npy`` (N, C, H, W),
``truth.parquet``, ``rejects.parquet``, optional ``arc_masks.npy``) and writes
``manifest.parquet``, ``shards/``, ``stats.json``, ``rejects.parquet`` and
``samples.png``. Works in chunks so a dataset larger than memory streams through.

Rows a source marks ``unlabelled`` (a boolean truth column) are the pretraining-only
pool: split ``unlabelled``, label ``""``, label_id -1, taxonomy ranks null and numeric
truth (regression targets) NaN (:func:`ssl4sci.splits.cut_pool_labels`). They never enter the
stratified split, the classes or the per-split counts; the normalisation statistics
and the dataset crop box use the train split and the pool (both are unlabelled data
to pretraining).

Bad images (non-finite, constant, no label) are recorded in ``rejects.parquet`` with the
source's rejects and skipped. When all of them are more than ``max_reject_fraction`` of
the images, the stage stops before any work with one line, writing only ``rejects.parquet``.
Classes too small to reach val or test are listed in ``stats.json`` ``warnings``.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ssl4sci.data import UNLABELLED, shard_file
from ssl4sci.io import write_json, write_npy, write_parquet
from ssl4sci.rejects import REJECT_COLUMNS, check_reject_fraction, merge_rejects
from ssl4sci.shards import layout_stats, publish_shards, split_counts, write_samples_png
from ssl4sci.splits import cut_pool_labels, pool_mask, split_warnings, split_with_pool

CHUNK = 1024
MAD_TO_SIGMA = 1.4826


def robust_signal_mask(images: np.ndarray, n_sigma: float) -> np.ndarray:
    """Pixels above background: > median + n_sigma * 1.4826 * MAD of the 3x3-smoothed image (channels averaged).

    Black-background-aware: the background level and noise are estimated from the
    image itself, so a faint arc on a dark sky and a bright object on grey both work.
    """
    gray = images.mean(axis=1) if images.ndim == 4 else images
    # A 3x3 mean filter first: single noise spikes above the threshold would otherwise
    # stretch the signal box to the whole image.
    gray = F.avg_pool2d(torch.from_numpy(np.ascontiguousarray(gray, dtype=np.float32))[:, None], 3, stride=1, padding=1,
                        count_include_pad=False)[:, 0].numpy()
    flat = gray.reshape(len(gray), -1)
    med = np.median(flat, axis=1)
    mad = np.median(np.abs(flat - med[:, None]), axis=1)
    # A perfectly flat (noise-free) background has MAD 0: fall back to a fraction of the range.
    scale = np.where(mad > 0, MAD_TO_SIGMA * mad, 1e-3 * (flat.max(axis=1) - flat.min(axis=1) + 1e-12))
    return gray > (med + n_sigma * scale)[:, None, None]


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1), end-exclusive, of the True pixels; None when there are none."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def square_box(box: tuple[int, int, int, int] | None, margin: float, height: int,
               width: int) -> tuple[int, int, int, int]:
    """Grow a box by ``margin`` of its side, make it square about its centre, keep it inside the image."""
    if box is None:
        return 0, height, 0, width
    y0, y1, x0, x1 = box
    side = max(y1 - y0, x1 - x0)
    side = int(np.ceil(side * (1 + 2 * margin)))
    side = max(1, min(side, height, width))
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    top = int(round(cy - side / 2))
    left = int(round(cx - side / 2))
    top = min(max(top, 0), height - side)
    left = min(max(left, 0), width - side)
    return top, top + side, left, left + side


def dataset_box(masks: list[np.ndarray], margin: float, height: int, width: int,
                coverage: float = 0.99) -> tuple[int, int, int, int]:
    """One box that holds the signal of ``coverage`` of the images (robust to a few outliers)."""
    boxes = np.array([b for b in (bounding_box(m) for m in masks) if b is not None])
    if len(boxes) == 0:
        return 0, height, 0, width
    lo, hi = (1 - coverage) * 100, coverage * 100
    box = (
        int(np.floor(np.percentile(boxes[:, 0], lo))),
        int(np.ceil(np.percentile(boxes[:, 1], hi))),
        int(np.floor(np.percentile(boxes[:, 2], lo))),
        int(np.ceil(np.percentile(boxes[:, 3], hi))),
    )
    return square_box(box, margin, height, width)


def scale_intensity(images: np.ndarray, mode: str) -> np.ndarray:
    if mode == "none":
        return images.astype(np.float32, copy=False)
    lo = images.min(axis=(1, 2, 3), keepdims=True)
    hi = images.max(axis=(1, 2, 3), keepdims=True)
    return ((images - lo) / np.maximum(hi - lo, 1e-12)).astype(np.float32)


def crop_resize(images: np.ndarray, boxes: list[tuple[int, int, int, int]], size: int, masks: np.ndarray | None = None):
    """Crop each image to its box and resize to size×size (antialiased bilinear; masks by area > 0.5)."""
    out = np.empty((len(images), images.shape[1], size, size), dtype=np.float32)
    out_masks = None if masks is None else np.empty((len(images), size, size), dtype=bool)
    for i, (y0, y1, x0, x1) in enumerate(boxes):
        crop = torch.from_numpy(np.ascontiguousarray(images[i, :, y0:y1, x0:x1]))[None]
        out[i] = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0].numpy()
        if masks is not None:
            m = torch.from_numpy(masks[i, y0:y1, x0:x1].astype(np.float32))[None, None]
            out_masks[i] = F.interpolate(m, size=(size, size), mode="area")[0, 0].numpy() > 0.5
    return out, out_masks


def _unusable_rows(images: np.ndarray, truth: pd.DataFrame, raw_dir: Path) -> tuple[np.ndarray, list[dict[str, str]]]:
    """(keep mask, rejects): non-finite or constant images, and labelled rows (not the pool) without a label."""
    rejects = []
    keep = np.ones(len(truth), dtype=bool)
    for start in range(0, len(truth), CHUNK):
        block = np.asarray(images[start : start + CHUNK], dtype=np.float32)
        finite = np.isfinite(block).all(axis=(1, 2, 3))
        flat = np.where(np.isfinite(block), block, 0).reshape(len(block), -1)
        constant = flat.max(axis=1) == flat.min(axis=1)
        for j in np.flatnonzero(~finite | constant):
            keep[start + j] = False
            reason = "non-finite pixel values" if not finite[j] else "constant image (no signal)"
            rejects.append({"id": str(truth["id"].iloc[start + j]), "path": str(raw_dir / "images.npy"),
                            "reason": reason, "stage": "prepare"})
    labels = truth["label"]
    # an empty label would otherwise become a class named ""
    no_label = (labels.isna() | (labels.astype(str).str.strip() == "")).to_numpy() & ~pool_mask(truth) & keep
    for i in np.flatnonzero(no_label):
        keep[i] = False
        rejects.append({"id": str(truth["id"].iloc[i]), "path": str(raw_dir / "truth.parquet"),
                        "reason": "missing label", "stage": "prepare"})
    return keep, rejects


def _check_raw(raw_dir: Path) -> tuple[np.ndarray, pd.DataFrame, np.ndarray | None]:
    images_path, truth_path = raw_dir / "images.npy", raw_dir / "truth.parquet"
    for p in (images_path, truth_path):
        if not p.exists():
            raise FileNotFoundError(f"{p}: missing; expected the raw layout written by a source "
                                    "(images.npy, truth.parquet)")
    images = np.load(images_path, mmap_mode="r")
    if images.ndim != 4:
        raise ValueError(f"{images_path}: expected an array of shape (N, C, H, W), got {images.shape}")
    truth = pd.read_parquet(truth_path)
    if len(truth) != len(images):
        raise ValueError(f"{truth_path}: has {len(truth)} rows but images.npy has {len(images)} images")
    for col in ("id", "label"):
        if col not in truth.columns:
            raise ValueError(f"{truth_path}: expected a column '{col}'")
    masks_path = raw_dir / "arc_masks.npy"
    masks = np.load(masks_path, mmap_mode="r") if masks_path.exists() else None
    return images, truth, masks


def _kept_rows(images: np.ndarray, truth: pd.DataFrame, raw_dir: Path, out_dir: Path,
               limit: float) -> tuple[np.ndarray, pd.DataFrame]:
    """(indices of the usable images, every reject: the source's then this stage's). Unusable images (non-finite or
    constant, no label) are skipped without stopping the run, unless they are more than ``limit`` of all."""
    keep, rejects = _unusable_rows(images, truth, raw_dir)
    kept = np.flatnonzero(keep)
    if kept.size == 0:
        raise ValueError(f"{raw_dir / 'images.npy'}: every image was rejected; see the reasons in rejects")
    raw_rejects_path = raw_dir / "rejects.parquet"
    all_rejects = merge_rejects(pd.read_parquet(raw_rejects_path) if raw_rejects_path.exists() else pd.DataFrame(),
                                rejects)
    check_reject_fraction(all_rejects, int(kept.size), limit, out_dir / "rejects.parquet")
    return kept, all_rejects


def _labelled_manifest(truth: pd.DataFrame, kept: np.ndarray, raw_dir: Path, cfg: dict[str, Any],
                       source: str) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """(manifest of the kept rows with label_id, split and source; pool mask; classes in source order)."""
    manifest = truth.iloc[kept].reset_index(drop=True).copy()
    manifest["source_index"] = kept
    pool = pool_mask(manifest)
    if pool.all():
        raise ValueError(f"{raw_dir / 'truth.parquet'}: no labelled image is left (every kept image is in the "
                         "unlabelled pool)")
    manifest["label"] = manifest["label"].fillna("").astype(str)
    classes = list(dict.fromkeys(manifest["label"][~pool]))  # order of first appearance = source order
    manifest["label_id"] = manifest["label"].map({c: i for i, c in enumerate(classes)}).fillna(-1).astype(np.int64)
    manifest["split"] = split_with_pool(manifest["label"], pool, cfg["split"], cfg["seed"])
    manifest["source"] = source
    return cut_pool_labels(manifest, pool), pool, classes


def _shared_crop_box(images: np.ndarray, kept: np.ndarray, in_stats: np.ndarray,
                     cfg: dict[str, Any]) -> tuple[int, int, int, int]:
    """The one crop box of ``crop: dataset`` (from the signal of the images in the statistics); else the whole image
    (``per_image`` finds each image's box while streaming)."""
    height, width = images.shape[2:]
    if cfg["crop"] != "dataset":
        return 0, height, 0, width
    train_masks = []
    for start in range(0, len(kept), CHUNK):
        idx = kept[start : start + CHUNK][in_stats[start : start + CHUNK]]
        if idx.size:
            block = scale_intensity(np.asarray(images[idx], dtype=np.float32), cfg["intensity"])
            train_masks.extend(robust_signal_mask(block, cfg["signal_sigma"]))
    return dataset_box(train_masks, cfg["crop_margin"], height, width)


class _ShardWriter:
    """Writes blocks of any length as shards of exactly ``shard_size`` images (the last may hold fewer), with the
    arc masks alongside, and records each image's (shard, index)."""

    def __init__(self, shard_dir: Path, shard_size: int, dtype: np.dtype, n_images: int):
        self.shard_dir, self.shard_size, self.dtype = shard_dir, shard_size, dtype
        self.buffer: list[np.ndarray] = []
        self.mask_buffer: list[np.ndarray] = []
        self.n_shards = 0  # also the id of the shard being filled
        self.written = 0
        self.shard_col = np.empty(n_images, dtype=np.int64)
        self.index_col = np.empty(n_images, dtype=np.int64)

    def add(self, out: np.ndarray, out_masks: np.ndarray | None) -> None:
        """Split the block at shard boundaries, writing each shard as soon as it is full."""
        offset = 0
        while offset < len(out):
            room = self.shard_size - sum(len(b) for b in self.buffer)
            take = min(room, len(out) - offset)
            self.buffer.append(out[offset : offset + take])
            if out_masks is not None:
                self.mask_buffer.append(out_masks[offset : offset + take])
            self.shard_col[self.written : self.written + take] = self.n_shards
            self.index_col[self.written : self.written + take] = np.arange(self.shard_size - room,
                                                                         self.shard_size - room + take)
            self.written += take
            offset += take
            if take == room:
                self._flush()

    def close(self) -> None:
        """Write the last, partly filled shard."""
        if self.buffer:
            self._flush()

    def _flush(self) -> None:
        arr = np.concatenate(self.buffer)
        if self.dtype == np.uint8:
            arr = np.clip(np.round(arr * 255), 0, 255)
        # write_npy: a full disk is reported as ENOSPC naming the shard (numpy's own short write has no errno).
        write_npy(shard_file(self.shard_dir, self.n_shards), arr.astype(self.dtype))
        if self.mask_buffer:
            write_npy(self.shard_dir / f"mask-{self.n_shards:05d}.npy", np.concatenate(self.mask_buffer))
        self.buffer, self.mask_buffer, self.n_shards = [], [], self.n_shards + 1


def _write_shards(images: np.ndarray, raw_masks: np.ndarray | None, kept: np.ndarray, in_stats: np.ndarray,
                  box: tuple[int, int, int, int], cfg: dict[str, Any],
                  shard_dir: Path) -> tuple[_ShardWriter, np.ndarray, np.ndarray]:
    """Stream the kept images CHUNK at a time: scale, crop, resize, shard; (writer, mean, std), the statistics of the
    images in ``in_stats`` accumulated in float64."""
    channels, height, width = images.shape[1:]
    size = cfg["image_size"]
    writer = _ShardWriter(shard_dir, cfg["shard_size"], np.dtype(cfg["dtype"]), len(kept))
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    count = 0
    for start in range(0, len(kept), CHUNK):
        idx = kept[start : start + CHUNK]
        block = scale_intensity(np.asarray(images[idx], dtype=np.float32), cfg["intensity"])
        if cfg["crop"] == "per_image":
            signal = robust_signal_mask(block, cfg["signal_sigma"])
            boxes = [square_box(bounding_box(m), cfg["crop_margin"], height, width) for m in signal]
        else:
            boxes = [box] * len(idx)
        block_masks = None if raw_masks is None else np.asarray(raw_masks[idx], dtype=bool)
        out, out_masks = crop_resize(block, boxes, size, block_masks)
        stat_rows = in_stats[start : start + len(idx)]
        if stat_rows.any():
            t = out[stat_rows].astype(np.float64)
            total += t.sum(axis=(0, 2, 3))
            total_sq += (t**2).sum(axis=(0, 2, 3))
            count += t.shape[0] * size * size
        writer.add(out, out_masks)
    writer.close()
    mean = total / max(count, 1)
    std = np.sqrt(np.maximum(total_sq / max(count, 1) - mean**2, 1e-12))
    return writer, mean, std


def _stats(manifest: pd.DataFrame, pool: np.ndarray, classes: list[str], mean: np.ndarray, std: np.ndarray,
           box: tuple[int, int, int, int], n_shards: int, raw_shape: tuple[int, ...], has_masks: bool,
           n_rejected: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """The contents of stats.json (prints the split's warnings)."""
    _, channels, height, width = raw_shape
    counts = split_counts(manifest, classes)
    return {
        "channels": int(channels),
        "mean": mean.tolist(),
        "std": std.tolist(),
        "stats_from": ("train split and unlabelled pool" if pool.any() else "train split")
        + ", after intensity scaling, crop and resize",
        "image_size": cfg["image_size"],
        "raw_size": [int(height), int(width)],
        "crop": {"mode": cfg["crop"], "box_yyxx": list(box) if cfg["crop"] == "dataset" else None},
        "intensity": cfg["intensity"],
        **layout_stats(manifest, pool, classes, counts, dtype=cfg["dtype"], shard_size=cfg["shard_size"],
                       n_shards=n_shards, has_masks=has_masks, n_rejected=n_rejected),
        "warnings": split_warnings(counts, cfg["split"], classes),
    }


def prepare(raw_dir: str | Path, out_dir: str | Path, cfg: dict[str, Any], *, source: str = "",
            threads: int = 1) -> dict[str, Any]:
    """Run the whole stage; returns the stats written to stats.json.

    ``source`` (the source that wrote ``raw_dir``) fills the manifest's ``source`` column. ``threads`` is not used:
    it is there so the CLI calls both prepare stages alike."""
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    images, truth, raw_masks = _check_raw(raw_dir)
    kept, all_rejects = _kept_rows(images, truth, raw_dir, out_dir, cfg["max_reject_fraction"])
    manifest, pool, classes = _labelled_manifest(truth, kept, raw_dir, cfg, source)
    # The crop box and the normalisation statistics come from the training images and the pool.
    in_stats = manifest["split"].isin(["train", UNLABELLED]).to_numpy()
    box = _shared_crop_box(images, kept, in_stats, cfg)

    tmp_dir = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out_dir.parent if out_dir.parent.exists() else None))
    try:
        shard_dir = tmp_dir / "shards"
        shard_dir.mkdir()
        writer, mean, std = _write_shards(images, raw_masks, kept, in_stats, box, cfg, shard_dir)
        manifest["shard"] = writer.shard_col
        manifest["index"] = writer.index_col
        stats = _stats(manifest, pool, classes, mean, std, box, writer.n_shards, images.shape, raw_masks is not None,
                       len(all_rejects), cfg)
        # Publish: shards folder by rename, then the files (each atomic).
        out_dir.mkdir(parents=True, exist_ok=True)
        final_shards = publish_shards(shard_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)

    write_parquet(out_dir / "rejects.parquet", all_rejects[list(REJECT_COLUMNS)])
    write_json(out_dir / "stats.json", stats)
    write_samples_png(out_dir / "samples.png", manifest, final_shards, classes, cfg["samples_per_class"], cfg["seed"])
    write_parquet(out_dir / "manifest.parquet", manifest, metadata={"classes": ",".join(classes)})
    return stats
