"""Reader for the published DeepLense strong-lensing data sets (Model I, II, III).

Layout expected under ``cfg['path']``: one sub-folder per class holding ``.npy``
files, one image per file. Current releases name the folders ``no_sub``, ``cdm``
and ``axion``; older ones ``no``, ``sphere`` and ``vort``, which are mapped to the
current names (case-insensitively). A file holds

* a 2-D image ``(H, W)`` or one with a leading channel axis ``(1, H, W)``;
* for the axion class, usually a 2-element object array ``[image, m_axion]``
  with ``m_axion`` in eV; ``log10(m_axion)`` goes to the truth table. Only these
  files are loaded with ``allow_pickle=True``; a pickled file in another class is
  rejected.

Files that cannot be read, that have the wrong shape (not 2-D, or not the shape
of the first good image), non-finite pixels or an invalid axion mass are listed in
``rejects.parquet`` with the reason and skipped. With ``max_per_class`` set, the
files of each class are sorted by name and a seeded random subset of that size is
taken (kept in name order); rejected files in the subset are not replaced, so a
class can end up with fewer images. The selection of a class does not depend on
which other classes are read.

With ``unlabelled_path`` set, every ``.npy`` file under that folder (searched
recursively, sorted by path, no class sub-folders needed) is read the same way
and appended as the unlabelled pool: id ``unlabelled/<path inside the folder,
without .npy>``, label empty, ``unlabelled`` true in the truth table (false on the
labelled rows). A pool file may be an ``[image, m_axion]`` object array, as the
axion class's are (the mass is not kept: the pool has no truth). Files that are
in a class folder as well are left out of the pool.

Outputs (same layout as :func:`ssl4sci.sources.lensing_sim.simulate`, without
``arc_masks.npy``): ``images.npy`` float32 ``(N, 1, H, W)`` in class order
(``no_sub``, ``cdm``, ``axion`` unless ``classes`` says otherwise) then file-name
order; ``truth.parquet``; ``rejects.parquet``; ``provenance.json``. Images are kept
as published (no normalisation). The image stack is written through a memory map,
never held in memory whole.
"""
from __future__ import annotations

import datetime as _dt
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ssl4sci.io import POOL_COLUMN as UNLABELLED  # the pool column; also the pool ids' prefix
from ssl4sci.io import atomic_path, write_json, write_parquet

__all__ = ["CLASSES", "FOLDER_ALIASES", "read_folder"]

SOURCE_NAME = "deeplense"
CLASSES: tuple[str, ...] = ("no_sub", "cdm", "axion")
FOLDER_ALIASES: dict[str, str] = {
    "no_sub": "no_sub", "cdm": "cdm", "axion": "axion",
    "no": "no_sub", "sphere": "cdm", "vort": "axion",
}
TRUTH_COLUMNS = (
    "id", "label", "index", "log10_m_axion", "einstein_radius", "source_x", "source_y",
    "n_subhalos", "exposure_time", "seed", "path",
)
_COPY_BLOCK = 256  # images per block when compacting the stack after rejects


class _Reject(Exception):
    """A file that is recorded in rejects.parquet and skipped."""


# --------------------------------------------------------------------------- config and discovery

_KEYS = ("classes", "max_per_class", "path", "seed", "unlabelled_path")


def _check_cfg(cfg: dict) -> tuple[Path, list[str] | None, int | None, int, Path | None]:
    if not isinstance(cfg, dict):
        raise ValueError(f"deeplense: expected a mapping of settings, got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - set(_KEYS))
    if unknown:
        raise ValueError(f"deeplense.{unknown[0]}: unknown key (known keys: {', '.join(_KEYS)})")
    path = cfg.get("path")
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ValueError(f"deeplense.path: expected the data-set folder, got {path!r}")
    classes = cfg.get("classes")
    if classes is not None:
        if (not isinstance(classes, (list, tuple)) or not classes
                or not all(isinstance(c, str) and c in CLASSES for c in classes)
                or len(set(classes)) != len(classes)):
            raise ValueError(f"deeplense.classes: expected null or a non-empty list of distinct names "
                             f"from {list(CLASSES)}, got {classes!r}")
        classes = list(classes)
    mpc = cfg.get("max_per_class")
    if mpc is not None and (isinstance(mpc, bool) or not isinstance(mpc, (int, np.integer)) or mpc < 1):
        raise ValueError(f"deeplense.max_per_class: expected null or an integer >= 1, got {mpc!r}")
    seed = cfg.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"deeplense.seed: expected an integer >= 0, got {seed!r}")
    pool = cfg.get("unlabelled_path")
    if pool is not None:
        if not isinstance(pool, (str, os.PathLike)) or not str(pool):
            raise ValueError(f"deeplense.unlabelled_path: expected null or a folder of .npy files, got {pool!r}")
        pool = Path(pool)
        if not pool.is_dir():
            raise FileNotFoundError(f"deeplense.unlabelled_path: {pool} is not a folder (expected a folder of .npy files)")
    return Path(path), classes, (None if mpc is None else int(mpc)), int(seed), pool


def _class_folders(root: Path, classes: list[str] | None) -> dict[str, Path]:
    if not root.exists():
        raise FileNotFoundError(f"deeplense.path: {root} does not exist (expected a folder with class "
                                f"sub-folders {'/'.join(CLASSES)} or no/sphere/vort)")
    if not root.is_dir():
        raise ValueError(f"deeplense.path: {root} is not a folder (expected one with class sub-folders "
                         f"{'/'.join(CLASSES)} or no/sphere/vort)")
    found: dict[str, Path] = {}
    for entry in sorted(root.iterdir()):
        label = FOLDER_ALIASES.get(entry.name.lower())
        if label is None or not entry.is_dir():
            continue
        if label in found:
            raise ValueError(f"deeplense.path: {root} has two folders for class {label!r} "
                             f"({found[label].name}, {entry.name}); keep one")
        found[label] = entry
    if not found:
        raise ValueError(f"deeplense.path: {root} has no class sub-folders (expected "
                         f"{'/'.join(CLASSES)} or no/sphere/vort)")
    wanted = classes if classes is not None else [c for c in CLASSES if c in found]
    missing = [c for c in wanted if c not in found]
    if missing:
        aliases = [k for k, v in FOLDER_ALIASES.items() if v == missing[0]]
        raise FileNotFoundError(f"deeplense.path: {root} has no folder for class {missing[0]!r} "
                                f"(expected one of {'/'.join(aliases)})")
    return {c: found[c] for c in wanted}


def _select(files: list[Path], label: str, max_per_class: int | None, seed: int) -> list[Path]:
    files = sorted(files, key=lambda p: p.name)
    if max_per_class is None or len(files) <= max_per_class:
        return files
    rng = np.random.default_rng([seed, CLASSES.index(label)])
    keep = np.sort(rng.choice(len(files), size=max_per_class, replace=False))
    return [files[i] for i in keep]


# --------------------------------------------------------------------------- one file

def _as_image(arr: Any) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise _Reject(f"not a numeric image (dtype {arr.dtype})")
    if np.iscomplexobj(arr):
        raise _Reject("complex-valued image")
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or min(arr.shape) < 1:
        raise _Reject(f"wrong shape {tuple(arr.shape)} (expected (H, W) or (1, H, W))")
    return arr


def _load(path: Path, label: str | None) -> tuple[np.ndarray, float]:
    """(image (H, W), log10 m_axion or NaN); raises _Reject for a bad file. ``label`` None: a pool file,
    which may be an axion-style [image, m_axion] pair (its mass is checked, and dropped by the caller)."""
    pair_ok = label in ("axion", None)
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as exc:
        if not pair_ok or "allow_pickle" not in str(exc):
            raise _Reject(f"unreadable: {_one_line(exc)}") from None
        try:
            arr = np.load(path, allow_pickle=True)
        except Exception as exc2:  # noqa: BLE001 - any failure to unpickle is a reject
            raise _Reject(f"unreadable: {_one_line(exc2)}") from None
    except Exception as exc:  # noqa: BLE001 - truncated files, bad headers, I/O errors
        raise _Reject(f"unreadable: {_one_line(exc)}") from None
    if not isinstance(arr, np.ndarray):  # e.g. an .npz archive renamed to .npy
        close = getattr(arr, "close", None)
        if close is not None:
            close()
        raise _Reject(f"unreadable: {type(arr).__name__}, expected an .npy array")

    log10_m = float("nan")
    if arr.dtype == object:
        if not pair_ok:
            raise _Reject("object array outside the axion class")
        if arr.shape != (2,):
            raise _Reject(f"wrong shape {tuple(arr.shape)} for an axion object array (expected [image, m_axion])")
        img, mass = arr[0], arr[1]
        try:
            mass = float(np.asarray(mass, dtype=float).reshape(()))
        except (TypeError, ValueError):
            raise _Reject(f"invalid m_axion {mass!r}") from None
        if not (math.isfinite(mass) and mass > 0):
            raise _Reject(f"invalid m_axion {mass!r} (expected a positive mass in eV)")
        log10_m = math.log10(mass)
        arr = img
    image = _as_image(arr)
    if not np.all(np.isfinite(image)):
        raise _Reject("non-finite pixel values")
    return image, log10_m


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --------------------------------------------------------------------------- folder

def read_folder(cfg: dict, out_dir: str | Path, progress: bool = True) -> None:
    """cfg: {'path': str, 'classes': list[str] | None, 'max_per_class': int | None, 'seed': int,
    'unlabelled_path': str | None}.
    Writes the same files as simulate(): images.npy (N,1,H,W) float32, truth.parquet (id = '<class>/<file stem>',
    label, index, log10_m_axion, path, plus the same truth columns as NaN where unknown; with a pool, the rows of
    ``unlabelled_path`` follow, id 'unlabelled/<path>', label '', and a boolean ``unlabelled`` column), rejects.parquet
    (path, reason) for unreadable / wrong-shape / non-finite files (recorded and skipped, never a crash),
    provenance.json. No arc_masks.npy (not known for real data)."""
    import pandas as pd
    import pyarrow as pa
    from tqdm import tqdm

    root, classes, max_per_class, seed, pool_dir = _check_cfg(cfg)
    folders = _class_folders(root, classes)
    plan: list[tuple[str | None, Path]] = []  # label None: a pool file
    n_available: dict[str, int] = {}
    in_class_folders: set[str] = set()
    for label, folder in folders.items():
        files = [p for p in folder.iterdir() if p.suffix.lower() == ".npy" and p.is_file()]
        n_available[label] = len(files)
        in_class_folders.update(os.path.realpath(p) for p in files)
        plan.extend((label, p) for p in _select(files, label, max_per_class, seed))
    if not plan:
        raise ValueError(f"deeplense.path: no .npy files in the class folders of {root} "
                         f"({', '.join(str(f) for f in folders.values())})")
    pool_files: list[Path] = []
    if pool_dir is not None:
        pool_files = sorted((p for p in pool_dir.rglob("*") if p.suffix.lower() == ".npy" and p.is_file()
                             and os.path.realpath(p) not in in_class_folders), key=lambda p: p.as_posix())
        plan.extend((None, p) for p in pool_files)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = _dt.datetime.now(_dt.timezone.utc)
    rows: list[dict] = []
    rejects: list[dict] = []
    shape: tuple[int, int] | None = None
    buf_path: Path | None = None
    buf = None
    try:
        with atomic_path(out_dir / "images.npy") as img_tmp:
            for label, path in tqdm(plan, desc="deeplense", unit="file", file=sys.stderr,
                                    disable=not progress, dynamic_ncols=True):
                try:
                    image, log10_m = _load(path, label)
                    if shape is None:
                        shape = image.shape
                        # room for every selected file; compacted below if some are rejected
                        fd, tmp = tempfile.mkstemp(prefix=".images.npy.", suffix=".buf.npy", dir=out_dir)
                        os.close(fd)
                        buf_path = Path(tmp)
                        buf = np.lib.format.open_memmap(buf_path, mode="w+", dtype=np.float32,
                                                        shape=(len(plan), 1, *shape))
                    elif image.shape != shape:
                        raise _Reject(f"wrong shape {tuple(image.shape)} (first image has {tuple(shape)})")
                except _Reject as rej:
                    rejects.append({"path": str(path), "reason": str(rej)})
                    continue
                k = len(rows)
                buf[k, 0] = image.astype(np.float32)
                if label is None:  # the pool: no label, no truth
                    id_, log10_m = f"{UNLABELLED}/{path.relative_to(pool_dir).with_suffix('').as_posix()}", np.nan
                else:
                    id_ = f"{label}/{path.stem}"
                rows.append({
                    "id": id_, "label": label or "", "index": k, "log10_m_axion": log10_m,
                    "einstein_radius": np.nan, "source_x": np.nan, "source_y": np.nan,
                    "n_subhalos": np.nan, "exposure_time": np.nan, "seed": seed, "path": str(path),
                    UNLABELLED: label is None,
                })
            n = len(rows)
            if n == 0:
                raise ValueError(f"deeplense.path: none of the {len(plan)} selected files under {root} is a "
                                 f"usable image (first problem: {rejects[0]['path']}: {rejects[0]['reason']})")
            h, w = shape
            if buf is not None and n == len(plan):
                buf.flush()
                buf = None  # closes the memory map
                os.replace(buf_path, img_tmp)
                buf_path = None
            else:
                out = np.lib.format.open_memmap(img_tmp, mode="w+", dtype=np.float32, shape=(n, 1, h, w))
                for start in range(0, n, _COPY_BLOCK):
                    stop = min(start + _COPY_BLOCK, n)
                    out[start:stop] = buf[start:stop]
                out.flush()
                del out
            df = pd.DataFrame(rows, columns=list(TRUTH_COLUMNS) + ([UNLABELLED] if pool_dir is not None else []))
            df = df.astype({"index": "int64", "seed": "int64", "log10_m_axion": "float64",
                            "n_subhalos": "float64", "label": "object", "id": "object", "path": "object"})
            write_parquet(out_dir / "truth.parquet", df, metadata={"source": SOURCE_NAME})
            rej = pa.table({"path": pa.array([r["path"] for r in rejects], pa.string()),
                            "reason": pa.array([r["reason"] for r in rejects], pa.string())})
            write_parquet(out_dir / "rejects.parquet", rej, metadata={"source": SOURCE_NAME})
    finally:
        buf = None
        if buf_path is not None:
            buf_path.unlink(missing_ok=True)

    counts = {label: int(sum(r["label"] == label for r in rows)) for label in folders}
    write_json(out_dir / "provenance.json", {
        "source": SOURCE_NAME,
        "cfg": {"path": str(root), "classes": classes, "max_per_class": max_per_class, "seed": seed,
                "unlabelled_path": None if pool_dir is None else str(pool_dir)},
        "class_folders": {label: str(folder) for label, folder in folders.items()},
        "n_files_available": n_available,
        "n_images": len(rows),
        "n_images_per_class": counts,
        "n_unlabelled_files": len(pool_files),
        "n_unlabelled": int(sum(r[UNLABELLED] for r in rows)),
        "n_rejects": len(rejects),
        "image_shape": [1, *(shape or (0, 0))],
        "numpy_version": np.__version__,
        "python_version": sys.version.split()[0],
        "started_utc": started.isoformat(timespec="seconds"),
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    })
