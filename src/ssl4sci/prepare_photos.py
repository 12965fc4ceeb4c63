"""Prepare for photos: image files -> decoded, resized, centre-cropped, split uint8 shards.

Reads the raw layout a photo source writes (``metadata.parquet``: one row per image
with ``id``, ``path``, ``label`` and any provenance / taxonomy columns; optional
``rejects.parquet`` from the fetch) and writes the same ``data/`` layout as the
lensing prepare stage (:mod:`ssl4sci.prepare`), so every later stage works unchanged:
``manifest.parquet``, ``shards/shard-NNNNN.npy`` (uint8, ``(n, 3, S, S)``),
``stats.json``, ``rejects.parquet`` and ``samples.png``.

Decoding (:func:`decode_image`) turns any image Pillow can open into a ``(3, S, S)``
uint8 array:

* EXIF orientation is applied; of an animated / multi-frame file the first frame is used;
* grayscale (``L``, ``1``) is replicated to three channels;
* anything with alpha (``RGBA``, ``LA``, ``PA``, a palette with transparency) is
  composited on a **black** background (transparent -> 0, like the dark sky of the
  scientific images and the zero padding of the models);
* ``CMYK``, ``YCbCr`` and other colour modes go through Pillow's ``convert("RGB")``
  (embedded ICC profiles are not applied);
* high-bit-depth grayscale (``I;16*``, ``I``) is scaled by the image's own maximum
  (min-max when it holds negative values), so 12-bit data in a 16-bit container fills
  0..255 instead of clipping; float (``F``) is min-max scaled; a constant image becomes 0;
* the shorter side is resized to ``resize_shorter`` and the centre ``S x S`` is kept,
  in one antialiased ``Image.resize`` call with a crop box (nothing outside the crop is
  resampled). Large JPEGs are decoded at a reduced DCT scale first (``Image.draft``),
  never below ``resize_shorter`` on the shorter side;
* files that cannot be read (missing, zero bytes, not an image, truncated, corrupt,
  larger than ``Image.MAX_IMAGE_PIXELS``, a side of one pixel) are listed in
  ``rejects.parquet`` with a one-line reason and ``stage="prepare"``; the run goes on,
  unless the rejects (fetch and prepare) are more than ``max_reject_fraction`` of all
  the images: then the stage stops with one line and writes only ``rejects.parquet``.

Classes are numbered in sorted order. The split is :func:`ssl4sci.splits.stratified_split`
(seeded, per class) over the images that decoded, except that a class with fewer than
``min_count`` images goes to train whole (one or two images cannot be split three ways;
kept in train they still count for the SSL pretraining and the probes' training set).
Rows the source marks ``unlabelled`` (a boolean metadata column) are the pretraining-only
pool, as in :mod:`ssl4sci.prepare`: split ``unlabelled``, label ``""``, label_id -1, null
ranks; they need no label, never enter the split, the classes or the counts, and add to
the normalisation statistics.

Memory stays bounded: images are decoded ``CHUNK`` at a time by a thread pool (Pillow
releases the GIL while decoding and resizing) and written straight into memory-mapped
shard files in a temporary folder, renamed into place only when all are written. The
statistics (train split and pool) are exact integer sums per image (uint8 pixels), so they
are the same whatever the chunking or thread count.
"""
from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from ssl4sci.data import shard_file
from ssl4sci.io import open_memmap_reserved, write_json, write_parquet
from ssl4sci.rejects import check_reject_fraction, merge_rejects
from ssl4sci.shards import layout_stats, publish_shards, split_counts, write_samples_png
from ssl4sci.splits import cut_pool_labels, pool_mask, split_warnings, split_with_pool

CHUNK = 1024
MAX_SAMPLE_CLASSES = 8
REASON_CHARS = 200
RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
}
_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class PhotoError(Exception):
    """An image that decodes but cannot be used (e.g. larger than the decompression-bomb limit)."""


def default_resize_shorter(image_size: int) -> int:
    """The usual ImageNet ratio: 256 for 224."""
    return int(round(image_size * 256 / 224))


# ---------------------------------------------------------------------------------------------
# Decoding


def _high_bit_to_8bit(im: Image.Image) -> Image.Image:
    """``I;16*``/``I`` -> ``L`` scaled by the image's maximum (min-max if it has negatives); ``F`` -> min-max."""
    arr = np.asarray(im)
    if im.mode == "F":
        arr = arr.astype(np.float64)
        finite = np.isfinite(arr)
        if not finite.any():
            return Image.new("L", im.size, 0)
        lo, hi = float(arr[finite].min()), float(arr[finite].max())
        arr = np.where(finite, arr, lo)
    else:
        arr = arr.astype(np.float64)
        hi = float(arr.max())
        lo = min(0.0, float(arr.min()))
    if hi <= lo:
        return Image.new("L", im.size, 0)
    out = np.clip(np.rint((arr - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
    return Image.fromarray(out, "L")


def _on_black(im: Image.Image) -> Image.Image:
    """Composite an image with alpha on a black background: colour * alpha / 255."""
    if im.mode in ("LA", "La"):
        im = im.convert("LA")
        base_mode = "L"
    else:
        im = im.convert("RGBA")
        base_mode = "RGB"
    out = Image.new(base_mode, im.size, 0)
    out.paste(im.convert(base_mode), mask=im.getchannel("A"))
    return out


def to_8bit(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> ``RGB`` or ``L`` (grayscale is replicated later, after the resize: 3x less work)."""
    mode = im.mode
    if mode in ("RGB", "L"):
        return im
    if mode == "1":
        return im.convert("L")
    if mode in _HIGH_BIT_MODES or mode == "F":
        return _high_bit_to_8bit(im)
    if mode in _ALPHA_MODES:
        return _on_black(im)
    if mode == "P":
        has_alpha = "transparency" in im.info or (im.palette is not None and im.palette.mode == "RGBA")
        return _on_black(im.convert("RGBA")) if has_alpha else im.convert("RGB")
    return im.convert("RGB")  # CMYK, YCbCr, RGBX, LAB, HSV...; raises for the unconvertible


def _crop_box(width: int, height: int, size: int, shorter: int) -> tuple[float, float, float, float]:
    """Box, in source pixels, of the centre size x size crop after resizing the shorter side to ``shorter``."""
    side = size * min(width, height) / shorter
    x0, y0 = (width - side) / 2, (height - side) / 2
    return x0, y0, x0 + side, y0 + side


def decode_image(path: str | os.PathLike, size: int, shorter: int | None = None, *, resample: str) -> np.ndarray:
    """Read one image file as a ``(3, size, size)`` uint8 array; raises on anything unreadable. ``shorter``: the
    shorter side before the centre crop (None: the ImageNet ratio); ``resample``: a ``prepare.resample`` name."""
    shorter = default_resize_shorter(size) if shorter is None else int(shorter)
    if shorter < size:
        raise ValueError(f"resize_shorter ({shorter}) must be at least image_size ({size})")
    with Image.open(path) as im:
        # Image.open warns (not raises) between MAX_IMAGE_PIXELS and twice that: refuse those too.
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and im.width * im.height > limit:
            raise PhotoError(f"image of {im.width}x{im.height} pixels exceeds Image.MAX_IMAGE_PIXELS ({limit})")
        if min(im.size) < 2:  # a dot or a line: nothing 2-D to learn, only one colour stretched to the crop
            raise PhotoError(f"image of {im.width}x{im.height} pixels is too small (expected at least 2 pixels a side)")
        # Image.open stands on the first frame of an animated / multi-page file, which is the one used.
        if im.format in ("JPEG", "MPO"):
            # Decode at 1/2, 1/4 or 1/8 scale when the shorter side stays >= `shorter` (JPEG DCT scaling).
            m = min(im.size)
            if m >= 2 * shorter:
                im.draft(None, (math.ceil(im.width * shorter / m), math.ceil(im.height * shorter / m)))
        im.load()
        try:
            ImageOps.exif_transpose(im, in_place=True)
        except Exception:  # a broken EXIF block must not cost a good image: keep the stored orientation
            pass
        img = to_8bit(im)
        w, h = img.size
        out = img.resize((size, size), RESAMPLE[resample], box=_crop_box(w, h, size, shorter), reducing_gap=3.0)
    arr = np.asarray(out, dtype=np.uint8)
    if arr.ndim == 2:
        return np.broadcast_to(arr, (3, size, size)).copy()
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def reject_reason(exc: BaseException, path: str = "") -> str:
    """One short line: exception class and message, the (already recorded) path shortened to its name."""
    msg = str(exc)
    if path:
        msg = msg.replace(str(path), Path(path).name)
    msg = " ".join(msg.split())
    text = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 3] + "..."


# ---------------------------------------------------------------------------------------------
# The stage


def sample_classes(classes: list[str], most: int = MAX_SAMPLE_CLASSES) -> list[str]:
    """The classes shown in samples.png: all of them, or ``most`` spread evenly over the sorted list."""
    if len(classes) <= most:
        return list(classes)
    return [classes[k] for k in np.unique(np.linspace(0, len(classes) - 1, most).round().astype(int))]


def _read_metadata(raw_dir: Path) -> pd.DataFrame:
    path = raw_dir / "metadata.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; expected the raw layout written by a photo source "
                                "(metadata.parquet)")
    meta = pd.read_parquet(path)
    for col in ("id", "path", "label"):
        if col not in meta.columns:
            raise ValueError(f"{path}: expected a column '{col}'")
    return meta.reset_index(drop=True)


def _fetch_rejects(raw_dir: Path) -> pd.DataFrame:
    path = raw_dir / "rejects.parquet"
    return pd.read_parquet(path) if path.exists() else pd.DataFrame()


def _decode_workers(cfg: dict[str, Any], threads: int) -> int:
    """Decode threads: ``prepare.workers``, else ``threads``, else (``threads`` 0) the CPUs this process may use."""
    workers = cfg["workers"]
    if workers is None:
        workers = threads if threads else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                           else os.cpu_count())
    return max(1, int(workers or 1))


def _resize_shorter(cfg: dict[str, Any]) -> int:
    """``prepare.resize_shorter`` (null: the ImageNet ratio); config.validate_config checks it against
    ``prepare.image_size``."""
    size, shorter = cfg["image_size"], cfg["resize_shorter"]
    return default_resize_shorter(size) if shorter is None else int(shorter)


def _early_rejects(meta: pd.DataFrame, ids: np.ndarray, paths: list[str],
                   marked: np.ndarray) -> tuple[np.ndarray, list[dict[str, str]]]:
    """(usable mask, rejects): rows unusable before decoding, without a label (outside the pool) or an id seen
    before."""
    labels = meta["label"]
    rejects: list[dict[str, str]] = []
    usable = np.ones(len(meta), dtype=bool)
    seen_id = pd.Series(ids).duplicated().to_numpy()
    no_label = (labels.isna().to_numpy() | (labels.astype(str).str.strip() == "").to_numpy()) & ~marked
    for i in np.flatnonzero(seen_id | no_label):
        usable[i] = False
        reason = "missing label" if no_label[i] else "duplicate id (an earlier row has it)"
        rejects.append({"id": ids[i], "path": paths[i], "reason": reason, "stage": "prepare"})
    return usable, rejects


class _ShardFiller:
    """uint8 shard files of ``shard_size`` images, memory-mapped (disk blocks reserved) and filled one image at a
    time; the last is cut to what it holds when closed."""

    def __init__(self, shard_dir: Path, shard_size: int, size: int):
        self.shard_dir, self.shard_size, self.size = shard_dir, shard_size, size
        self.shard: np.ndarray | None = None
        self.shard_id, self.fill = -1, 0

    def put(self, image: np.ndarray) -> tuple[int, int]:
        """Store one image; its (shard, index)."""
        if self.shard is None or self.fill == self.shard_size:
            if self.shard is not None:
                self.shard.flush()
                self.shard = None  # closes the memory map
            self.shard_id, self.fill = self.shard_id + 1, 0
            self.shard = open_memmap_reserved(shard_file(self.shard_dir, self.shard_id), dtype=np.uint8,
                                              shape=(self.shard_size, 3, self.size, self.size))
        self.shard[self.fill] = image
        self.fill += 1
        return self.shard_id, self.fill - 1

    def close(self) -> int:
        """Flush, cut the last shard to the images it holds; the number of shards (0: no image was stored)."""
        if self.shard is None:
            return 0
        self.shard.flush()
        self.shard = None
        if self.fill < self.shard_size:  # the last shard holds only what was filled
            last = shard_file(self.shard_dir, self.shard_id)
            short = np.array(np.load(last, mmap_mode="r")[: self.fill])
            last.unlink()
            np.save(last, short)
            del short
        return self.shard_id + 1


def _decode_into(shards: _ShardFiller, rows: np.ndarray, ids: np.ndarray, paths: list[str], shorter: int,
                 resample: str, workers: int, rejects: list[dict[str, str]]) -> tuple[np.ndarray, ...]:
    """Decode ``rows`` CHUNK at a time on ``workers`` threads into ``shards`` in row order; a file that fails is
    appended to ``rejects``. Returns, per metadata row: (decoded, exact pixel sums per channel, sums of squares,
    shard, index)."""
    n, size = len(ids), shards.size
    ok = np.zeros(n, dtype=bool)
    sums = np.zeros((n, 3), dtype=np.int64)  # exact per-image pixel sums, for the train statistics
    sums_sq = np.zeros((n, 3), dtype=np.int64)
    shard_col = np.full(n, -1, dtype=np.int64)
    index_col = np.full(n, -1, dtype=np.int64)
    block = np.empty((CHUNK, 3, size, size), dtype=np.uint8)

    def work(j: int, i: int) -> str | None:
        """Decode row i into block[j]; the reason on failure."""
        try:
            arr = decode_image(paths[i], size, shorter, resample=resample)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a reject, never a crash
            return reject_reason(exc, paths[i])
        block[j] = arr
        flat = arr.reshape(3, -1)
        sums[i] = flat.sum(axis=1, dtype=np.int64)
        wide = flat.astype(np.int64)
        sums_sq[i] = np.einsum("ij,ij->i", wide, wide)
        return None

    n_kept = 0
    t0 = time.perf_counter()
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=workers) as pool:
        # Between MAX_IMAGE_PIXELS and twice that, Pillow only warns: make it a reject (decode_image checks too).
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        for start in range(0, len(rows), CHUNK):
            chunk = rows[start : start + CHUNK]
            results = list(pool.map(work, range(len(chunk)), chunk))
            for j, (i, reason) in enumerate(zip(chunk, results)):
                if reason is not None:
                    rejects.append({"id": ids[i], "path": paths[i], "reason": reason, "stage": "prepare"})
                    continue
                shard_col[i], index_col[i] = shards.put(block[j])
                ok[i] = True
                n_kept += 1
            done = start + len(chunk)
            rate = done / max(time.perf_counter() - t0, 1e-9)
            print(f"prepare_photos: {done}/{len(rows)} decoded, {n_kept} kept, {rate:.0f} images/s", file=sys.stderr,
                  flush=True)
    return ok, sums, sums_sq, shard_col, index_col


def _photo_manifest(meta: pd.DataFrame, ids: np.ndarray, marked: np.ndarray, ok: np.ndarray, shard_col: np.ndarray,
                    index_col: np.ndarray, cfg: dict[str, Any], raw_dir: Path) -> tuple[Any, ...]:
    """The manifest of the decoded rows: sorted classes, the split (classes under ``min_count`` whole in train), the
    pool's labels cut. Returns (manifest, kept rows, pool mask, statistics mask, classes, small classes)."""
    kept = np.flatnonzero(ok)
    in_pool = marked[kept]
    if in_pool.all():
        raise ValueError(f"{raw_dir / 'metadata.parquet'}: no labelled image decoded (every kept image is in the "
                         "unlabelled pool)")
    manifest = meta.iloc[kept].reset_index(drop=True).copy()
    manifest["id"] = ids[kept]
    manifest["label"] = manifest["label"].where(~in_pool, "").astype(str)
    manifest["source_index"] = kept
    classes = sorted(manifest["label"][~in_pool].unique())
    manifest["label_id"] = manifest["label"].map({c: k for k, c in enumerate(classes)}).fillna(-1).astype(np.int64)
    # label_id follows sorted class order, so splitting on it is the same as splitting on the names
    # (and much faster with many classes).
    split = split_with_pool(manifest["label_id"], in_pool, cfg["split"], cfg["seed"])
    class_size = manifest["label_id"].map(manifest["label_id"][~in_pool].value_counts()).fillna(0).to_numpy()
    small = (class_size < cfg["min_count"]) & ~in_pool
    split[small] = "train"
    manifest["split"] = split
    manifest["shard"] = shard_col[kept]
    manifest["index"] = index_col[kept]
    manifest = cut_pool_labels(manifest, in_pool)
    small_classes = sorted(manifest.loc[small, "label"].unique())
    return manifest, kept, in_pool, (split == "train") | in_pool, classes, small_classes


def _moments(sums: np.ndarray, sums_sq: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) per channel, in [0, 1] units, of the images whose exact uint8 pixel sums (and sums of squares)
    are given: the same whatever the chunking or thread count."""
    count = len(sums) * size * size
    total = sums.sum(axis=0).astype(np.float64)
    total_sq = sums_sq.sum(axis=0).astype(np.float64)
    mean = total / max(count, 1) / 255.0
    var = total_sq / max(count, 1) / 255.0**2 - mean**2
    return mean, np.sqrt(np.maximum(var, 1e-12))


def _photo_stats(manifest: pd.DataFrame, in_pool: np.ndarray, classes: list[str], small_classes: list[str],
                 mean: np.ndarray, std: np.ndarray, shorter: int, n_shards: int, n_rejected: int,
                 cfg: dict[str, Any]) -> dict[str, Any]:
    """The contents of stats.json (prints the split's warnings)."""
    counts = split_counts(manifest, classes)
    return {
        "channels": 3,
        "mean": mean.tolist(),
        "std": std.tolist(),
        "stats_from": ("train split and unlabelled pool" if in_pool.any() else "train split")
        + ", after decode, resize and centre crop (uint8 / 255)",
        "image_size": cfg["image_size"],
        "raw_size": None,
        "crop": {"mode": "center", "box_yyxx": None},
        "intensity": "none",
        "resize": {
            "shorter": shorter,
            "resample": cfg["resample"],
            "crop": "center",
            "jpeg_draft": True,
            "alpha": "composited on black",
            "high_bit_depth": "scaled by the image maximum (min-max if negative); float min-max",
        },
        **layout_stats(manifest, in_pool, classes, counts, dtype="uint8", shard_size=cfg["shard_size"],
                       n_shards=n_shards, has_masks=False, n_rejected=n_rejected),
        "min_count": cfg["min_count"],
        "small_classes_in_train": small_classes,
        "warnings": split_warnings(counts, cfg["split"], classes),
    }


def prepare_photos(raw_dir: str | Path, out_dir: str | Path, cfg: dict[str, Any], *, source: str = "",
                   threads: int = 1) -> dict[str, Any]:
    """Run the whole stage; returns the stats written to stats.json.

    ``threads`` (the CLI's ``--threads``) is the decode parallelism unless ``cfg['workers']`` is set; 0 = the CPUs
    this process may use. ``source`` is not used: it is there so the CLI calls both prepare stages alike.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    size, shorter = cfg["image_size"], _resize_shorter(cfg)
    meta = _read_metadata(raw_dir)
    ids = meta["id"].astype(str).to_numpy()
    marked = pool_mask(meta)  # the unlabelled pool
    paths = [str(p) if os.path.isabs(str(p)) else str(raw_dir / str(p)) for p in meta["path"].astype(str)]
    usable, rejects = _early_rejects(meta, ids, paths, marked)

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".prepare-photos-", dir=out_dir))
    try:
        shard_dir = tmp_dir / "shards"
        shard_dir.mkdir()
        shards = _ShardFiller(shard_dir, cfg["shard_size"], size)
        ok, sums, sums_sq, shard_col, index_col = _decode_into(shards, np.flatnonzero(usable), ids, paths, shorter,
                                                               cfg["resample"], _decode_workers(cfg, threads), rejects)
        n_shards = shards.close()
        if n_shards == 0:
            raise ValueError(f"{raw_dir / 'metadata.parquet'}: every image was rejected; see the reasons in the "
                             f"rejects (first: {rejects[0]['reason'] if rejects else 'no rows'})")
        manifest, kept, in_pool, in_stats, classes, small_classes = _photo_manifest(meta, ids, marked, ok, shard_col,
                                                                                    index_col, cfg, raw_dir)
        mean, std = _moments(sums[kept][in_stats], sums_sq[kept][in_stats], size)

        all_rejects = merge_rejects(_fetch_rejects(raw_dir), rejects)
        check_reject_fraction(all_rejects, len(manifest), cfg["max_reject_fraction"], out_dir / "rejects.parquet")
        stats = _photo_stats(manifest, in_pool, classes, small_classes, mean, std, shorter, n_shards,
                             len(all_rejects), cfg)

        # samples.png from the temporary shards, at most MAX_SAMPLE_CLASSES evenly spread classes.
        write_samples_png(out_dir / "samples.png", manifest, shard_dir, sample_classes(classes),
                          cfg["samples_per_class"], cfg["seed"])

        # Publish: the shards folder by rename, then the files (each atomic), the manifest last.
        publish_shards(shard_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)

    write_parquet(out_dir / "rejects.parquet", all_rejects)
    write_json(out_dir / "stats.json", stats)
    write_parquet(out_dir / "manifest.parquet", manifest, metadata={"classes": ",".join(classes)})
    return stats
