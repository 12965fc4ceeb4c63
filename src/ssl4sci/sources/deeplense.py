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

Files that cannot be read (truncated, empty, not an array), that have the wrong
shape (not 2-D, or not the common shape), a non-numeric or complex dtype, non-finite
pixels, values beyond the float32 range or an invalid axion mass are listed in
``rejects.parquet`` with the reason and skipped. The common shape is the most
frequent one among the plain ``.npy`` headers (read before any pixel, so one odd
file cannot set it; pickled axion pairs do not vote), else the first good image's.
A file whose header shows the wrong shape or too few bytes is rejected without
reading its pixels. With ``max_per_class`` set, the
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
from ssl4sci.io import atomic_path, open_memmap_reserved, write_json, write_parquet

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
HEADER_SHAPE = "the most common shape among the .npy headers is"
PICKLE_REFUSED = "unreadable: pickled data or not an .npy file (pickles are loaded only for axion files)"


class _Reject(Exception):
    """A file that is recorded in rejects.parquet and skipped."""


# --------------------------------------------------------------------------- config and discovery

def _settings(cfg: dict) -> tuple[Path, list[str] | None, int | None, int, Path | None]:
    """(folder, classes, max_per_class, seed, pool folder) from the validated ``deeplense`` section: the schema checks
    its keys, types and bounds, config.validate_config that the folders exist. The pool folder is checked again
    here, as a missing one would otherwise read as an empty pool."""
    pool = cfg["unlabelled_path"]
    if pool is not None:
        pool = Path(pool)
        if not pool.is_dir():
            raise FileNotFoundError(f"deeplense.unlabelled_path: {pool} is not a folder "
                                    "(expected a folder of .npy files)")
    classes = cfg["classes"]
    return Path(cfg["path"]), (None if classes is None else list(classes)), cfg["max_per_class"], cfg["seed"], pool


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

def _image_shape(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(H, W) of a stored array of shape (H, W) or (1, H, W); None for any other shape."""
    shape = tuple(int(n) for n in shape)
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    return shape if len(shape) == 2 and min(shape) >= 1 else None  # type: ignore[return-value]


def _bad_shape(shape: tuple[int, ...]) -> _Reject:
    return _Reject(f"wrong shape {tuple(shape)} (expected (H, W) or (1, H, W))")


def _as_image(arr: Any) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise _Reject(f"not a numeric image (dtype {arr.dtype})")
    if np.iscomplexobj(arr):
        raise _Reject("complex-valued image")
    if _image_shape(arr.shape) is None:
        raise _bad_shape(arr.shape)
    return arr[0] if arr.ndim == 3 else arr


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int, int] | None:
    """(shape, dtype, bytes before the data, file size) from a plain .npy header, reading nothing else; None when the
    file has no header numpy's public readers parse (not an .npy, a pickle, a damaged header: np.load then says
    why)."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        with open(path, "rb") as fh:
            reader = readers.get(np.lib.format.read_magic(fh))
            if reader is None:
                return None
            shape, _, dtype = reader(fh)
            return tuple(shape), dtype, fh.tell(), os.fstat(fh.fileno()).st_size
    except Exception:  # noqa: BLE001 - any unparsable header: left to np.load, which rejects it with its reason
        return None


def _check_header(path: Path, expected: tuple[int, int] | None) -> None:
    """Reject from the header alone a plain array of the wrong shape or with fewer bytes than it declares, so a
    huge or truncated file is never read into memory."""
    header = _npy_header(path)
    if header is None or header[1].hasobject:  # object arrays hold the image inside a pickle: checked once loaded
        return
    shape, dtype, offset, size = header
    image_shape = _image_shape(shape)
    if image_shape is None:
        raise _bad_shape(shape)
    if expected is not None and image_shape != expected:
        raise _Reject(f"wrong shape {image_shape} ({HEADER_SHAPE} {expected})")
    needed = offset + math.prod(shape) * dtype.itemsize
    if size < needed:
        raise _Reject(f"unreadable: truncated ({size} bytes; its header's {tuple(shape)} {dtype} needs {needed})")


def _common_shape(paths: list[Path]) -> tuple[int, int] | None:
    """The most frequent (H, W) among the plain .npy headers of ``paths`` (ties: the first seen); None when no
    header gives one (e.g. only pickled axion pairs)."""
    counts: dict[tuple[int, int], int] = {}
    for path in paths:
        header = _npy_header(path)
        shape = None if header is None or header[1].hasobject else _image_shape(header[0])
        if shape is not None:
            counts[shape] = counts.get(shape, 0) + 1
    return max(counts, key=counts.__getitem__) if counts else None


def _load(path: Path, label: str | None, expected: tuple[int, int] | None = None) -> tuple[np.ndarray, float]:
    """(image (H, W), log10 m_axion or NaN); raises _Reject for a bad file. ``label`` None: a pool file,
    which may be an axion-style [image, m_axion] pair (its mass is checked, and dropped by the caller).
    ``expected``: the common (H, W), when known, checked from the header before any pixel is read."""
    pair_ok = label in ("axion", None)
    _check_header(path, expected)
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as exc:
        if not pair_ok or "allow_pickle" not in str(exc):
            # numpy's advice to unpickle does not fit a data set: say why the file is refused instead
            raise _Reject(PICKLE_REFUSED if "allow_pickle" in str(exc) else f"unreadable: {_one_line(exc)}") from None
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
    # the stack is float32: a wider float beyond its range would turn into inf there
    if image.dtype.kind == "f" and image.dtype.itemsize > 4 and np.abs(image).max() > np.finfo(np.float32).max:
        raise _Reject("pixel values beyond the float32 range")
    return image, log10_m


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --------------------------------------------------------------------------- folder

def _plan(root: Path, folders: dict[str, Path], max_per_class: int | None, seed: int,
          pool_dir: Path | None) -> tuple[list[tuple[str | None, Path]], dict[str, int], list[Path]]:
    """(the files to read in order, as (label, path): each class's selection, then the pool's with label None;
    .npy files available per class; the pool's files, those in a class folder as well left out)."""
    plan: list[tuple[str | None, Path]] = []
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
    return plan, n_available, pool_files


class _Stack:
    """The image stack, written through a memory-mapped buffer with room for every planned file (opened at the first
    good image, whose shape it takes), then moved, or compacted when files were rejected, into ``images.npy``."""

    def __init__(self, out_dir: Path, n_planned: int):
        self.out_dir, self.n_planned = out_dir, n_planned
        self.buf: np.ndarray | None = None
        self.buf_path: Path | None = None

    def put(self, k: int, image: np.ndarray) -> None:
        if self.buf is None:
            fd, tmp = tempfile.mkstemp(prefix=".images.npy.", suffix=".buf.npy", dir=self.out_dir)
            os.close(fd)
            self.buf_path = Path(tmp)
            self.buf = open_memmap_reserved(self.buf_path, dtype=np.float32, shape=(self.n_planned, 1, *image.shape))
        self.buf[k, 0] = image.astype(np.float32)

    def save(self, path: Path, n: int, shape: tuple[int, int]) -> None:
        """Write the first ``n`` images to ``path``: the buffer itself when every planned file was kept."""
        h, w = shape
        if self.buf is not None and n == self.n_planned:
            self.buf.flush()
            self.buf = None  # closes the memory map
            os.replace(self.buf_path, path)
            self.buf_path = None
            return
        out = open_memmap_reserved(path, dtype=np.float32, shape=(n, 1, h, w))
        for start in range(0, n, _COPY_BLOCK):
            stop = min(start + _COPY_BLOCK, n)
            out[start:stop] = self.buf[start:stop]
        out.flush()
        del out

    def discard(self) -> None:
        """Remove the buffer file, if it is still there."""
        self.buf = None
        if self.buf_path is not None:
            self.buf_path.unlink(missing_ok=True)


def _truth_row(label: str | None, path: Path, k: int, log10_m: float, seed: int, pool_dir: Path | None) -> dict:
    """The truth of image ``k``: id '<class>/<file stem>', or for a pool file 'unlabelled/<path>' with no truth."""
    if label is None:  # the pool: no label, no truth
        id_, log10_m = f"{UNLABELLED}/{path.relative_to(pool_dir).with_suffix('').as_posix()}", np.nan
    else:
        id_ = f"{label}/{path.stem}"
    return {
        "id": id_, "label": label or "", "index": k, "log10_m_axion": log10_m,
        "einstein_radius": np.nan, "source_x": np.nan, "source_y": np.nan,
        "n_subhalos": np.nan, "exposure_time": np.nan, "seed": seed, "path": str(path),
        UNLABELLED: label is None,
    }


def _read_files(plan: list[tuple[str | None, Path]], stack: _Stack, seed: int, pool_dir: Path | None,
                progress: bool) -> tuple[list[dict], list[dict], tuple[int, int] | None]:
    """Read every planned file into ``stack``: (truth rows, rejects as path and reason, the common image shape)."""
    from tqdm import tqdm

    rows: list[dict] = []
    rejects: list[dict] = []
    # the headers choose the shape, so a bad first file cannot get every good one rejected
    shape: tuple[int, int] | None = _common_shape([path for _, path in plan])
    shape_from = HEADER_SHAPE if shape is not None else "the first image has"
    for label, path in tqdm(plan, desc="deeplense", unit="file", file=sys.stderr,
                            disable=not progress, dynamic_ncols=True):
        try:
            image, log10_m = _load(path, label, shape)
            if shape is not None and image.shape != shape:  # a pickled pair's image: seen only now
                raise _Reject(f"wrong shape {tuple(image.shape)} ({shape_from} {tuple(shape)})")
        except _Reject as rej:
            rejects.append({"path": str(path), "reason": str(rej)})
            continue
        shape = image.shape  # already set, unless no header gave one
        stack.put(len(rows), image)
        rows.append(_truth_row(label, path, len(rows), log10_m, seed, pool_dir))
    return rows, rejects, shape


def _write_tables(out_dir: Path, rows: list[dict], rejects: list[dict], with_pool: bool) -> None:
    """truth.parquet (with the ``unlabelled`` column when there is a pool) and rejects.parquet."""
    import pandas as pd
    import pyarrow as pa

    df = pd.DataFrame(rows, columns=list(TRUTH_COLUMNS) + ([UNLABELLED] if with_pool else []))
    df = df.astype({"index": "int64", "seed": "int64", "log10_m_axion": "float64",
                    "n_subhalos": "float64", "label": "object", "id": "object", "path": "object"})
    write_parquet(out_dir / "truth.parquet", df, metadata={"source": SOURCE_NAME})
    rej = pa.table({"path": pa.array([r["path"] for r in rejects], pa.string()),
                    "reason": pa.array([r["reason"] for r in rejects], pa.string())})
    write_parquet(out_dir / "rejects.parquet", rej, metadata={"source": SOURCE_NAME})


def read_folder(cfg: dict, out_dir: str | Path, progress: bool = True) -> None:
    """cfg: the validated ``deeplense`` section ({'path': str, 'classes': list[str] | None, 'max_per_class': int | None,
    'seed': int, 'unlabelled_path': str | None}).
    Writes the same files as simulate(): images.npy (N,1,H,W) float32, truth.parquet (id = '<class>/<file stem>',
    label, index, log10_m_axion, path, plus the same truth columns as NaN where unknown; with a pool, the rows of
    ``unlabelled_path`` follow, id 'unlabelled/<path>', label '', and a boolean ``unlabelled`` column), rejects.parquet
    (path, reason) for unreadable / wrong-shape / non-finite files (recorded and skipped, never a crash),
    provenance.json. No arc_masks.npy (not known for real data)."""
    root, classes, max_per_class, seed, pool_dir = _settings(cfg)
    folders = _class_folders(root, classes)
    plan, n_available, pool_files = _plan(root, folders, max_per_class, seed, pool_dir)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = _dt.datetime.now(_dt.timezone.utc)
    stack = _Stack(out_dir, len(plan))
    try:
        with atomic_path(out_dir / "images.npy") as img_tmp:
            rows, rejects, shape = _read_files(plan, stack, seed, pool_dir, progress)
            if not rows:
                raise ValueError(f"deeplense.path: none of the {len(plan)} selected files under {root} is a "
                                 f"usable image (first problem: {rejects[0]['path']}: {rejects[0]['reason']})")
            stack.save(img_tmp, len(rows), shape)
            _write_tables(out_dir, rows, rejects, pool_dir is not None)
    finally:
        stack.discard()

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
