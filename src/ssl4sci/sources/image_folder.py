"""Photos from a local folder, written in the raw photo layout (:mod:`ssl4sci.sources.raw_layout`).

:func:`read_image_folder` reads either a folder with one sub-folder per class (label = sub-folder
name; images found recursively inside it) or a CSV with ``path`` and ``label`` columns (paths
relative to the CSV's folder or absolute; optional rank columns and ``id``), plus, with
``unlabelled_path``, every image under that folder (recursively) as the unlabelled pool.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterable

from ssl4sci.labels import RANKS
from ssl4sci.sources.archive import SourceError
from ssl4sci.sources.raw_layout import UNLABELLED, check_image_file, clean, reject, write_raw

__all__ = ["SourceError", "read_image_folder"]


def _settings(cfg: dict) -> dict:
    """A copy of the validated ``image_folder`` section (the schema refuses empty paths and extensions not like
    ``.jpg``) with the extensions lower-cased, each once, sorted."""
    return {**cfg, "extensions": sorted({e.lower() for e in cfg["extensions"]})}


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
    """cfg: the validated ``image_folder`` section: exactly one of ``path`` (a folder with one sub-folder per class)
    and ``csv`` (a CSV with path,label[,id,ranks]), ``unlabelled_path`` (null, or a folder of images, searched
    recursively: the unlabelled pool, id ``unlabelled/<path inside it>``) and ``extensions`` (case-insensitive).
    Writes the raw layout into ``out_dir`` and returns the provenance (counts included).

    Folder mode: id = ``<class>/<path inside the class folder>``; files outside class folders and
    other extensions are ignored (counted). CSV mode: id = the ``id`` column, else the path as
    written; missing files, empty files, empty labels and repeated ids are rejected."""
    settings = _settings(cfg)
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
