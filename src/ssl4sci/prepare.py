"""Prepare: raw images -> cropped, resized, split, normalised-statistics shards.

Reads the uniform raw layout every source writes (``images.npy`` (N, C, H, W),
``truth.parquet``, ``rejects.parquet``, optional ``arc_masks.npy``) and writes
``manifest.parquet``, ``shards/``, ``stats.json``, ``rejects.parquet`` and
``samples.png``. Works in chunks so a dataset larger than memory streams through.

Rows a source marks ``unlabelled`` (a boolean truth column) are the pretraining-only
pool: split ``unlabelled``, label ``""``, label_id -1, taxonomy ranks null and numeric
truth (regression targets) NaN (:func:`cut_pool_labels`). They never enter the
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
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ssl4sci.data import UNLABELLED, shard_file
from ssl4sci.io import POOL_COLUMN, save_figure, write_json, write_npy, write_parquet
from ssl4sci.sources.image_folder import RANKS

CHUNK = 1024
MAD_TO_SIGMA = 1.4826
# Pool rows keep these numeric columns (provenance); every other numeric column is truth and becomes NaN.
POOL_KEPT_COLUMNS = ("index", "seed", "source_index", "shard")
# Text columns that name what an image shows, nulled for pool rows (other text columns are provenance: ids, paths).
POOL_CUT_TEXT_COLUMNS = (*RANKS, "common")


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


def square_box(box: tuple[int, int, int, int] | None, margin: float, height: int, width: int) -> tuple[int, int, int, int]:
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


def dataset_box(masks: list[np.ndarray], margin: float, height: int, width: int, coverage: float = 0.99) -> tuple[int, int, int, int]:
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


def stratified_split(labels: pd.Series, fractions: dict[str, float], seed: int) -> np.ndarray:
    """Seeded per-class split; each class keeps the train/val/test proportions (rounded), and at least one train
    image when the train fraction is not 0 (a class seen only in val or test could be scored but never learned)."""
    rng = np.random.default_rng(seed)
    split = np.empty(len(labels), dtype=object)
    for label in sorted(labels.unique()):
        idx = np.flatnonzero(labels.to_numpy() == label)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(fractions["test"] * len(idx)))
        n_val = int(round(fractions["val"] * len(idx)))
        if fractions["train"] > 0:
            n_test = min(n_test, len(idx) - 1)
            n_val = min(n_val, len(idx) - 1 - n_test)
        split[idx[:n_test]] = "test"
        split[idx[n_test : n_test + n_val]] = "val"
        split[idx[n_test + n_val :]] = "train"
    return split.astype(str)


def pool_mask(table: pd.DataFrame) -> np.ndarray:
    """Which rows of a raw truth / metadata table a source marked as the unlabelled pool (none without the column)."""
    if POOL_COLUMN not in table.columns:
        return np.zeros(len(table), dtype=bool)
    return table[POOL_COLUMN].fillna(False).astype(bool).to_numpy()


def split_with_pool(labels: pd.Series, pool: np.ndarray, fractions: dict[str, float], seed: int) -> np.ndarray:
    """:func:`stratified_split` of the labelled rows; pool rows get the split ``unlabelled``."""
    split = np.full(len(labels), UNLABELLED, dtype=object)
    split[~pool] = stratified_split(labels[~pool].reset_index(drop=True), fractions, seed)
    return split.astype(str)


def cut_pool_labels(manifest: pd.DataFrame, pool: np.ndarray) -> pd.DataFrame:
    """Cut what a source knows about the pool rows: label "", label_id -1, null taxonomy ranks (and common
    name), NaN in every numeric truth column (regression targets such as log10_m_axion); provenance stays."""
    manifest = manifest.drop(columns=[POOL_COLUMN], errors="ignore")  # the split says it now
    if not pool.any():
        return manifest
    for col in manifest.columns:
        if col in POOL_KEPT_COLUMNS or col in ("label", "label_id"):
            continue
        if col in POOL_CUT_TEXT_COLUMNS:
            manifest[col] = manifest[col].astype(object)
            manifest.loc[pool, col] = None
        elif pd.api.types.is_numeric_dtype(manifest[col]) and not pd.api.types.is_bool_dtype(manifest[col]):
            manifest[col] = manifest[col].astype(np.float64)
            manifest.loc[pool, col] = np.nan
    manifest.loc[pool, "label"] = ""
    manifest.loc[pool, "label_id"] = -1
    return manifest


def max_reject_fraction(cfg: dict[str, Any]) -> float:
    """The validated ``prepare.max_reject_fraction``; its default lives in the config schema only."""
    value = cfg.get("max_reject_fraction")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"prepare.max_reject_fraction: expected a number from 0 to 1, got {value!r}")
    return float(value)


def check_reject_fraction(rejects: pd.DataFrame, n_kept: int, limit: float, rejects_path: Path) -> None:
    """Stop the stage in one line when more than ``limit`` of the images were rejected (fetch and prepare): then the
    data or the settings are wrong, not a few files.

    The list goes to ``rejects.over_limit.parquet`` beside ``rejects_path``: not an output of the stage, so it
    survives Snakemake removing the failed job's outputs; a later run within the limit removes it."""
    listed = rejects_path.with_name("rejects.over_limit.parquet")
    total = len(rejects) + n_kept
    fraction = len(rejects) / total if total else 0.0
    if fraction <= limit:
        listed.unlink(missing_ok=True)
        return
    write_parquet(listed, rejects)
    # Decoders quote the file's name in their message: count "cannot identify image file '<file>'" as one reason.
    names = [Path(p).name for p in rejects["path"]]
    reasons = pd.Series([r.replace(f"'{n}'", "'<file>'") if n else r
                         for r, n in zip(rejects["reason"], names)]).value_counts()
    raise ValueError(f"prepare.max_reject_fraction: {fraction:.3g} of the images were rejected ({len(rejects)} of "
                     f"{total}), more than the allowed {limit:g}; most common reason ({reasons.iloc[0]} images): "
                     f"{reasons.index[0]}; every reject is listed in {listed}")


def merge_rejects(fetch_rejects: pd.DataFrame, rejects: list[dict[str, str]]) -> pd.DataFrame:
    """The source's rejects (stage ``fetch`` unless they say) then this stage's, as id, path, reason, stage strings."""
    fetch_rejects = fetch_rejects.copy()
    if len(fetch_rejects):
        stage = fetch_rejects["stage"] if "stage" in fetch_rejects.columns else pd.Series("fetch", index=fetch_rejects.index)
        fetch_rejects["stage"] = stage.fillna("fetch")
    columns = ["id", "path", "reason", "stage"]
    merged = pd.concat([fetch_rejects, pd.DataFrame(rejects, columns=columns)], ignore_index=True)
    for col in columns:
        if col not in merged.columns:
            merged[col] = pd.Series(dtype=str)
    return merged[columns].fillna("").astype(str)


def split_warnings(counts: dict[str, dict[str, int]], fractions: dict[str, float], classes: list[str]) -> list[str]:
    """What a later stage should know about the split: one class only, classes missing from val or test."""
    found = []
    if len(classes) == 1:
        found.append(f"one class only ({classes[0]!r}): the label-based evaluations need at least 2")
    for split in ("val", "test"):
        missing = [c for c in classes if fractions[split] > 0 and counts[split][c] == 0]
        if missing:
            named = ", ".join(repr(c) for c in missing[:5]) + (", ..." if len(missing) > 5 else "")
            found.append(f"{len(missing)} class(es) have no {split} images, too few to split: {named}")
    for line in found:
        print(f"prepare: warning: {line}", file=sys.stderr)
    return found


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
            rejects.append({"id": str(truth["id"].iloc[start + j]), "path": str(raw_dir / "images.npy"), "reason": reason, "stage": "prepare"})
    labels = truth["label"]
    # an empty label would otherwise become a class named ""
    no_label = (labels.isna() | (labels.astype(str).str.strip() == "")).to_numpy() & ~pool_mask(truth) & keep
    for i in np.flatnonzero(no_label):
        keep[i] = False
        rejects.append({"id": str(truth["id"].iloc[i]), "path": str(raw_dir / "truth.parquet"), "reason": "missing label", "stage": "prepare"})
    return keep, rejects


def _check_raw(raw_dir: Path) -> tuple[np.ndarray, pd.DataFrame, np.ndarray | None]:
    images_path, truth_path = raw_dir / "images.npy", raw_dir / "truth.parquet"
    for p in (images_path, truth_path):
        if not p.exists():
            raise FileNotFoundError(f"{p}: missing; expected the raw layout written by a source (images.npy, truth.parquet)")
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


def prepare(raw_dir: str | Path, out_dir: str | Path, cfg: dict[str, Any], source: str = "") -> dict[str, Any]:
    """Run the whole stage; returns the stats written to stats.json."""
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    images, truth, raw_masks = _check_raw(raw_dir)
    n, channels, height, width = images.shape
    size = cfg["image_size"]

    limit = max_reject_fraction(cfg)

    # 1. Reject unusable images (non-finite or constant, no label) without stopping the run, unless too many are.
    keep, rejects = _unusable_rows(images, truth, raw_dir)
    kept = np.flatnonzero(keep)
    if kept.size == 0:
        raise ValueError(f"{raw_dir / 'images.npy'}: every image was rejected; see the reasons in rejects")
    raw_rejects_path = raw_dir / "rejects.parquet"
    all_rejects = merge_rejects(pd.read_parquet(raw_rejects_path) if raw_rejects_path.exists() else pd.DataFrame(), rejects)
    check_reject_fraction(all_rejects, int(kept.size), limit, out_dir / "rejects.parquet")

    manifest = truth.iloc[kept].reset_index(drop=True).copy()
    manifest["source_index"] = kept
    pool = pool_mask(manifest)
    if pool.all():
        raise ValueError(f"{raw_dir / 'truth.parquet'}: no labelled image is left (every kept image is in the unlabelled pool)")
    manifest["label"] = manifest["label"].fillna("").astype(str)
    classes = list(dict.fromkeys(manifest["label"][~pool]))  # order of first appearance = source order
    manifest["label_id"] = manifest["label"].map({c: i for i, c in enumerate(classes)}).fillna(-1).astype(np.int64)
    manifest["split"] = split_with_pool(manifest["label"], pool, cfg["split"], cfg["seed"])
    manifest["source"] = source
    manifest = cut_pool_labels(manifest, pool)

    # 2. Crop boxes: one for the dataset (from the training images and the pool), or one per image.
    in_stats = manifest["split"].isin(["train", UNLABELLED]).to_numpy()
    if cfg["crop"] == "dataset":
        train_masks = []
        for start in range(0, len(kept), CHUNK):
            idx = kept[start : start + CHUNK][in_stats[start : start + CHUNK]]
            if idx.size:
                block = scale_intensity(np.asarray(images[idx], dtype=np.float32), cfg["intensity"])
                train_masks.extend(robust_signal_mask(block, cfg["signal_sigma"]))
        box = dataset_box(train_masks, cfg["crop_margin"], height, width)
    else:
        box = (0, height, 0, width)

    # 3. Stream: scale, crop, resize, shard; accumulate train + pool statistics in float64.
    tmp_dir = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out_dir.parent if out_dir.parent.exists() else None))
    try:
        shard_dir = tmp_dir / "shards"
        shard_dir.mkdir()
        shard_size, dtype = cfg["shard_size"], np.dtype(cfg["dtype"])
        total = np.zeros(channels)
        total_sq = np.zeros(channels)
        count = 0
        buffer, mask_buffer, shard_id = [], [], 0
        shard_col = np.empty(len(kept), dtype=np.int64)
        index_col = np.empty(len(kept), dtype=np.int64)

        def flush():
            nonlocal buffer, mask_buffer, shard_id
            arr = np.concatenate(buffer)
            if dtype == np.uint8:
                arr = np.clip(np.round(arr * 255), 0, 255)
            # write_npy: a full disk is reported as ENOSPC naming the shard (numpy's own short write has no errno).
            write_npy(shard_file(shard_dir, shard_id), arr.astype(dtype))
            if mask_buffer:
                write_npy(shard_dir / f"mask-{shard_id:05d}.npy", np.concatenate(mask_buffer))
            buffer, mask_buffer, shard_id = [], [], shard_id + 1

        pos = 0
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
            # Split blocks at shard boundaries so every shard (but the last) has exactly shard_size images.
            offset = 0
            while offset < len(out):
                room = shard_size - sum(len(b) for b in buffer)
                take = min(room, len(out) - offset)
                buffer.append(out[offset : offset + take])
                if out_masks is not None:
                    mask_buffer.append(out_masks[offset : offset + take])
                shard_col[pos : pos + take] = shard_id
                index_col[pos : pos + take] = np.arange(shard_size - room, shard_size - room + take)
                pos += take
                offset += take
                if take == room:
                    flush()
        if buffer:
            flush()

        mean = total / max(count, 1)
        std = np.sqrt(np.maximum(total_sq / max(count, 1) - mean**2, 1e-12))
        manifest["shard"] = shard_col
        manifest["index"] = index_col
        counts = {s: manifest[manifest["split"] == s]["label"].value_counts().reindex(classes, fill_value=0).to_dict() for s in ("train", "val", "test")}
        stats = {
            "channels": int(channels),
            "mean": mean.tolist(),
            "std": std.tolist(),
            "stats_from": ("train split and unlabelled pool" if pool.any() else "train split")
            + ", after intensity scaling, crop and resize",
            "image_size": size,
            "raw_size": [int(height), int(width)],
            "crop": {"mode": cfg["crop"], "box_yyxx": list(box) if cfg["crop"] == "dataset" else None},
            "intensity": cfg["intensity"],
            "dtype": cfg["dtype"],
            "shard_size": shard_size,
            "n_shards": shard_id,
            "has_masks": raw_masks is not None,
            "classes": classes,
            "n_images": int(len(manifest)),
            "n_unlabelled": int(pool.sum()),
            "n_rejected": 0,
            "counts": counts,
            "warnings": split_warnings(counts, cfg["split"], classes),
        }
        stats["n_rejected"] = int(len(all_rejects))

        # Publish: shards folder by rename, then the files (each atomic).
        out_dir.mkdir(parents=True, exist_ok=True)
        final_shards = publish_shards(shard_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)

    write_parquet(out_dir / "rejects.parquet", all_rejects[["id", "path", "reason", "stage"]])
    write_json(out_dir / "stats.json", stats)
    write_samples_png(out_dir / "samples.png", manifest, final_shards, classes, cfg["samples_per_class"], cfg["seed"])
    write_parquet(out_dir / "manifest.parquet", manifest, metadata={"classes": ",".join(classes)})
    return stats


def publish_shards(shard_dir: Path, out_dir: Path) -> Path:
    """Move a finished temporary shards folder to ``out_dir/shards`` (replacing an old one) and return it."""
    final = out_dir / "shards"
    if final.exists():
        shutil.rmtree(final)
    shard_dir.rename(final)
    return final


def write_samples_png(path: Path, manifest: pd.DataFrame, shard_dir: Path, classes: list[str], per_class: int, seed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(len(classes), per_class, figsize=(1.6 * per_class, 1.7 * len(classes)), squeeze=False)
    shards: dict[int, np.ndarray] = {}
    for r, label in enumerate(classes):
        rows = manifest[manifest["label"] == label]
        pick = rows.iloc[np.sort(rng.choice(len(rows), size=min(per_class, len(rows)), replace=False))]
        for c in range(per_class):
            ax = axes[r, c]
            ax.axis("off")
            if c >= len(pick):
                continue
            row = pick.iloc[c]
            shard = shards.setdefault(int(row["shard"]), np.load(shard_file(shard_dir, row["shard"]), mmap_mode="r"))
            img = np.asarray(shard[int(row["index"])], dtype=np.float32)
            ax.imshow(img[0] if img.shape[0] != 3 else np.clip(np.moveaxis(img, 0, -1) / max(img.max(), 1e-12), 0, 1), cmap="inferno")
            if c == 0:
                ax.set_title(label, fontsize=9, loc="left")
    fig.suptitle("Prepared samples per class (after crop and resize)", fontsize=10)
    save_figure(path, fig)
