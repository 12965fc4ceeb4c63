"""Photos from a local folder, and the raw layout every photo source writes.

Raw layout (``results/<exp>/raw/``), shared with :mod:`ssl4sci.sources.hub`:

* ``metadata.parquet``: one row per kept image, all columns strings (null where unknown):
  ``id`` (unique, stable across runs), ``path`` (absolute path of the image file; files already on
  local disk are never copied), ``label`` (the default class name), the seven ranks
  ``kingdom, phylum, class, order, family, genus, species`` (``species`` holds the binomial, as the
  label does for species-level sources), ``source``, then source-specific provenance columns.
  A source with an unlabelled pool (images only pretraining reads) adds a boolean column
  ``unlabelled``, true on the pool rows; those rows need no label.
* ``rejects.parquet``: ``id, path, reason, stage`` (stage ``"fetch"``) for every row dropped.
* ``provenance.json``: source, settings, counts (kept, dropped by reason), time.

Every file is written atomically (:mod:`ssl4sci.io`), metadata and rejects before provenance.

:func:`read_image_folder` reads either a folder with one sub-folder per class (label = sub-folder
name; images found recursively inside it) or a CSV with ``path`` and ``label`` columns (paths
relative to the CSV's folder or absolute; optional rank columns and ``id``), plus, with
``unlabelled_path``, every image under that folder (recursively) as the unlabelled pool.
"""
from __future__ import annotations

import copy
import datetime as _dt
import os
import time
from pathlib import Path
from typing import Any, Iterable

from ssl4sci.io import POOL_COLUMN as UNLABELLED  # the pool column; also the pool ids' prefix
from ssl4sci.io import write_json, write_parquet
from ssl4sci.sources.archive import SourceError

__all__ = [
    "BASE_COLUMNS", "IMAGE_EXTENSIONS", "RANKS", "REJECT_COLUMNS", "SourceError",
    "UNLABELLED", "merge_settings", "read_image_folder", "write_raw",
]

RANKS: tuple[str, ...] = ("kingdom", "phylum", "class", "order", "family", "genus", "species")
BASE_COLUMNS: tuple[str, ...] = ("id", "path", "label", *RANKS, "source")
REJECT_COLUMNS: tuple[str, ...] = ("id", "path", "reason", "stage")
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")

IMAGE_FOLDER_DEFAULTS: dict[str, Any] = {"path": None, "csv": None, "unlabelled_path": None,
                                         "extensions": list(IMAGE_EXTENSIONS)}


# --------------------------------------------------------------------------- shared helpers

def clean(value: Any, collapse: bool = True) -> str | None:
    """A metadata cell as a stripped string (inner whitespace runs collapsed to one space unless
    ``collapse`` is False, as for file names), or None for missing / NaN / empty."""
    if value is None:
        return None
    if isinstance(value, float) and value != value:  # NaN
        return None
    text = " ".join(str(value).split()) if collapse else str(value).strip()
    if not text or text.lower() in ("nan", "none", "null"):
        return None
    return text


def reject(rejects: list[dict], id_: Any, path: Any, reason: str) -> None:
    rejects.append({"id": None if id_ is None else str(id_), "path": None if path is None else str(path),
                    "reason": reason, "stage": "fetch"})


def check_image_file(path: Path) -> str | None:
    """None when ``path`` is a non-empty regular file, else the reject reason."""
    try:
        st = path.stat()
    except OSError:
        return "image file not found"
    if not path.is_file():
        return "image path is not a file"
    if st.st_size == 0:
        return "empty image file"
    return None


def count_reasons(rejects: Iterable[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rejects:
        counts[r["reason"]] = counts.get(r["reason"], 0) + 1
    return dict(sorted(counts.items()))


def write_raw(out_dir: str | os.PathLike, rows: list[dict], rejects: list[dict], provenance: dict,
              extra_columns: Iterable[str] = (), what: str = "source") -> dict:
    """Write metadata.parquet, rejects.parquet and provenance.json into ``out_dir``; return provenance.

    Rows with a true ``unlabelled`` key are the pool: metadata gets a boolean ``unlabelled`` column
    (only when there is a pool). Raises SourceError (writing nothing) when no image was kept or ids repeat."""
    import pyarrow as pa

    out_dir = Path(out_dir)
    extra = [c for c in extra_columns if c not in BASE_COLUMNS]
    columns = [*BASE_COLUMNS, *extra]
    reasons = count_reasons(rejects)
    if not rows:
        detail = ", ".join(f"{n} {r}" for r, n in reasons.items()) or "nothing listed"
        raise SourceError(f"{what}: no image kept ({detail}); check the settings and the data")
    seen: set[str] = set()
    for row in rows:
        if row["id"] in seen:
            raise SourceError(f"{what}: id {row['id']!r} occurs twice; ids must be unique")
        seen.add(row["id"])

    def table(records: list[dict], names: list[str] | tuple[str, ...]) -> "pa.Table":
        data = {c: [None if r.get(c) is None else str(r.get(c)) for r in records] for c in names}
        return pa.Table.from_pydict(data, schema=pa.schema([(c, pa.string()) for c in names]))

    pool = [bool(r.get(UNLABELLED)) for r in rows]
    metadata = table(rows, columns)
    if any(pool):
        metadata = metadata.append_column(UNLABELLED, pa.array(pool, pa.bool_()))
        columns = [*columns, UNLABELLED]
    provenance = dict(provenance)
    provenance["counts"] = {"kept": len(rows), "dropped": len(rejects), "dropped_by_reason": reasons,
                            **({"unlabelled": sum(pool)} if any(pool) else {}), **provenance.get("counts", {})}
    provenance.setdefault("written_at", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    provenance["columns"] = columns
    write_parquet(out_dir / "metadata.parquet", metadata, metadata={"ssl4sci.source": what})
    write_parquet(out_dir / "rejects.parquet", table(rejects, REJECT_COLUMNS))
    write_json(out_dir / "provenance.json", provenance)
    return provenance


# --------------------------------------------------------------------------- local folder

def merge_settings(section: str, cfg: Any, defaults: dict) -> dict:
    """A source's settings: ``cfg`` (a mapping, or None) over deep copies of ``defaults``; unknown keys are errors."""
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, dict):
        raise SourceError(f"{section}: expected a mapping of settings, got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - set(defaults))
    if unknown:
        raise SourceError(f"{section}.{unknown[0]}: unknown key (known keys: {', '.join(sorted(defaults))})")
    out = copy.deepcopy(defaults)
    out.update(copy.deepcopy(cfg))
    return out


def _check_cfg(cfg: Any) -> dict:
    out = merge_settings("image_folder", cfg, IMAGE_FOLDER_DEFAULTS)
    out["extensions"] = list(out["extensions"]) if isinstance(out["extensions"], (list, tuple)) else out["extensions"]
    has_path, has_csv = out["path"] is not None, out["csv"] is not None
    if has_path == has_csv:
        raise SourceError("image_folder: expected exactly one of image_folder.path (a folder with one sub-folder "
                          "per class) or image_folder.csv (a CSV with path and label columns)")
    for key in ("path", "csv", "unlabelled_path"):
        value = out[key]
        if value is not None and (not isinstance(value, (str, os.PathLike)) or not str(value)):
            raise SourceError(f"image_folder.{key}: expected a path, got {value!r}")
    ext = out["extensions"]
    if (not isinstance(ext, list) or not ext
            or not all(isinstance(e, str) and e.startswith(".") and len(e) > 1 for e in ext)):
        raise SourceError(f"image_folder.extensions: expected a non-empty list like ['.jpg', '.png'], got {ext!r}")
    out["extensions"] = sorted({e.lower() for e in ext})
    return out


def _image_files(folder: Path, extensions: set[str], ignored: dict[str, int]) -> Iterable[Path]:
    """Image files under ``folder`` (recursively, name order, hidden entries skipped); other files are
    counted in ``ignored['not_an_image']``."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            if path.suffix.lower() not in extensions:
                ignored["not_an_image"] += 1
                continue
            yield path


def _class_folder_rows(root: Path, extensions: set[str]) -> tuple[list[dict], list[dict], dict]:
    if not root.is_dir():
        raise SourceError(f"image_folder.path: {root} is not a folder (expected one sub-folder per class)")
    rows: list[dict] = []
    rejects: list[dict] = []
    ignored = {"not_an_image": 0, "outside_class_folders": 0}
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            ignored["outside_class_folders"] += 1
            continue
        label = entry.name
        for path in _image_files(entry, extensions, ignored):
            rel = path.relative_to(root).as_posix()
            reason = check_image_file(path)
            if reason:
                reject(rejects, rel, path.absolute(), reason)
                continue
            rows.append({"id": rel, "path": str(path.absolute()), "label": label, "source": "image_folder"})
    return rows, rejects, ignored


def _pool_rows(folder: Path, extensions: set[str], labelled: list[dict]) -> tuple[list[dict], list[dict], dict]:
    """The unlabelled pool: every image under ``folder`` (recursively), id ``unlabelled/<path inside it>``.
    Files that are labelled rows too (the folder overlaps the labelled data) stay out of the pool."""
    if not folder.is_dir():
        raise SourceError(f"image_folder.unlabelled_path: {folder} is not a folder (expected a folder of images)")
    taken = {os.path.realpath(r["path"]) for r in labelled}
    rows: list[dict] = []
    rejects: list[dict] = []
    ignored = {"not_an_image": 0, "labelled": 0}
    for path in _image_files(folder, extensions, ignored):
        if os.path.realpath(path) in taken:
            ignored["labelled"] += 1
            continue
        id_ = f"{UNLABELLED}/{path.relative_to(folder).as_posix()}"
        reason = check_image_file(path)
        if reason:
            reject(rejects, id_, path.absolute(), reason)
            continue
        rows.append({"id": id_, "path": str(path.absolute()), "label": None, "source": "image_folder",
                     UNLABELLED: True})
    return rows, rejects, ignored


def _csv_rows(csv_path: Path, extensions: set[str]) -> tuple[list[dict], list[dict], dict, list[str]]:
    import pandas as pd

    if not csv_path.is_file():
        raise SourceError(f"image_folder.csv: {csv_path} does not exist (expected a CSV with path and label columns)")
    try:
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=True)
    except (ValueError, OSError) as exc:
        raise SourceError(f"image_folder.csv: cannot read {csv_path} ({type(exc).__name__}: "
                          f"{' '.join(str(exc).split())})") from exc
    lower = {c.strip().lower(): c for c in df.columns}
    missing = [c for c in ("path", "label") if c not in lower]
    if missing:
        raise SourceError(f"image_folder.csv: {csv_path} has no {' or '.join(repr(m) for m in missing)} column "
                          f"(found {', '.join(map(str, df.columns))})")
    ranks = [r for r in RANKS if r in lower]
    base = csv_path.parent
    rows: list[dict] = []
    rejects: list[dict] = []
    ignored = {"not_an_image": 0}
    seen: set[str] = set()
    for record in df.to_dict("records"):
        given = clean(record[lower["path"]], collapse=False)
        id_ = clean(record[lower["id"]], collapse=False) if "id" in lower else given
        if given is None:
            reject(rejects, id_, None, "no image path")
            continue
        path = Path(given).expanduser()
        path = path if path.is_absolute() else base / path
        label = clean(record[lower["label"]])
        if label is None:
            reject(rejects, id_, path.absolute(), "no label")
            continue
        if id_ in seen:
            reject(rejects, id_, path.absolute(), "duplicate id")
            continue
        if path.suffix.lower() not in extensions:
            reject(rejects, id_, path.absolute(), "not an image file extension")
            continue
        reason = check_image_file(path)
        if reason:
            reject(rejects, id_, path.absolute(), reason)
            continue
        seen.add(id_)
        row = {"id": id_, "path": str(path.absolute()), "label": label, "source": "image_folder"}
        for r in ranks:
            row[r] = clean(record[lower[r]])
        rows.append(row)
    return rows, rejects, ignored, ranks


def read_image_folder(cfg: dict, out_dir: str | os.PathLike) -> dict:
    """cfg: ``{'path': folder with one sub-folder per class}`` or ``{'csv': CSV with path,label[,id,ranks]}``,
    optional ``unlabelled_path`` (a folder of images, searched recursively: the unlabelled pool, id
    ``unlabelled/<path inside it>``) and ``extensions`` (default jpg/jpeg/png/tif/tiff/bmp/webp,
    case-insensitive). Writes the raw layout into ``out_dir`` and returns the provenance (counts included).

    Folder mode: id = ``<class>/<path inside the class folder>``; files outside class folders and
    other extensions are ignored (counted). CSV mode: id = the ``id`` column, else the path as
    written; missing files, empty files, empty labels and repeated ids are rejected."""
    settings = _check_cfg(cfg)
    t0 = time.time()
    extensions = set(settings["extensions"])
    if settings["path"] is not None:
        root = Path(settings["path"]).expanduser()
        rows, rejects, ignored = _class_folder_rows(root, extensions)
        mode, where = "class_folders", str(root.absolute())
    else:
        csv_path = Path(settings["csv"]).expanduser()
        rows, rejects, ignored, _ = _csv_rows(csv_path, extensions)
        mode, where = "csv", str(csv_path.absolute())
    labels = len({r["label"] for r in rows})
    if settings["unlabelled_path"] is not None:
        pool_rows, pool_rejects, ignored["unlabelled"] = _pool_rows(
            Path(settings["unlabelled_path"]).expanduser(), extensions, rows)
        rows, rejects = rows + pool_rows, rejects + pool_rejects
    provenance = {
        "source": "image_folder",
        "mode": mode,
        "location": where,
        "config": settings,
        "counts": {"ignored": ignored, "labels": labels},
        "duration_s": round(time.time() - t0, 3),
    }
    return write_raw(out_dir, rows, rejects, provenance, what=f"image_folder ({where})")
