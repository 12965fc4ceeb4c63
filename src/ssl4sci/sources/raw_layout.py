"""The raw layout every photo source writes, and the small checks its rows share.

Raw layout (``results/<exp>/raw/``), written by :mod:`ssl4sci.sources.hub` and :mod:`ssl4sci.sources.image_folder`:

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
"""
from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Any, Iterable

from ssl4sci.io import POOL_COLUMN as UNLABELLED  # the pool column; also the pool ids' prefix
from ssl4sci.io import write_json, write_parquet
from ssl4sci.labels import RANKS
from ssl4sci.rejects import REJECT_COLUMNS
from ssl4sci.sources.archive import SourceError

__all__ = [
    "BASE_COLUMNS", "IMAGE_EXTENSIONS", "REJECT_COLUMNS", "UNLABELLED",
    "check_image_file", "clean", "count_reasons", "reject", "write_raw",
]

BASE_COLUMNS: tuple[str, ...] = ("id", "path", "label", *RANKS, "source")
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
"""File extensions read as images in the Hub repositories (a local folder's come from ``image_folder.extensions``)."""


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
