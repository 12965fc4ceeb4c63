"""Atomic writers: every output appears whole or not at all (and the raw layout's pool column name).

A stage that dies half-way must never leave a file that Snakemake (or a user)
would mistake for a finished result, so each writer goes to a temporary path in
the same folder and renames it into place.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

POOL_COLUMN = "unlabelled"
"""The raw layout's boolean truth / metadata column marking the unlabelled pool: every source that has a pool writes
it, the prepare stages read it. One spelling, here, because a source that wrote another would silently lose its pool."""


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_LOW_SPACE_BYTES = 1 << 20


def disk_full_error(exc: BaseException, path: str | os.PathLike) -> OSError | None:
    """``OSError(ENOSPC or EDQUOT, ..., path)`` when ``exc`` is a write to ``path`` that failed for lack of space.

    Call it before deleting the partial file. numpy's short write ("N requested and M written") and torch's
    stream writer carry no errno, so for those an (almost) full filesystem under ``path`` is taken as the cause.
    """
    code = getattr(exc, "errno", None)
    if not (isinstance(exc, OSError) and code in DISK_FULL_ERRNOS):
        if not isinstance(exc, (OSError, RuntimeError)) or code is not None:
            return None
        try:
            if shutil.disk_usage(Path(path).parent).free >= _LOW_SPACE_BYTES:
                return None
        except OSError:
            return None
        code = errno.ENOSPC
    return OSError(code, os.strerror(code), str(path))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it onto ``path`` on success.

    On failure the temporary file is deleted; a full disk is raised as ``OSError(ENOSPC or EDQUOT)`` naming ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp makes the file private (0600); results are meant to be read by the whole group.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException as exc:
        full = disk_full_error(exc, path)  # before the unlink frees the space it measures
        tmp_path.unlink(missing_ok=True)
        if full is not None:
            raise full from exc
        raise


def open_memmap_reserved(path: str | os.PathLike, dtype: Any, shape: tuple[int, ...]) -> np.memmap:
    """``np.lib.format.open_memmap(path, "w+")`` with the file's disk blocks reserved up front.

    The memmap file is sparse: on a full disk, the first write to a page with no block behind it kills the
    process with SIGBUS (no message, no clean-up). Reserving the blocks fails here instead, with ENOSPC naming
    ``path``. A filesystem that cannot reserve (no fallocate) keeps the sparse file, as before.
    """
    try:
        array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        _reserve_blocks(path)
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            raise OSError(exc.errno, os.strerror(exc.errno), str(path)) from exc
        raise
    return array


def _reserve_blocks(path: str | os.PathLike) -> None:
    if not hasattr(os, "posix_fallocate"):  # macOS
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            raise
    finally:
        os.close(fd)


def _to_jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks (checkpoints and downloads can be many GB)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_to_jsonable) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def write_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array)


def write_parquet(path: str | os.PathLike, table_or_df: Any, metadata: dict[str, str] | None = None) -> None:
    """Write a pandas DataFrame or pyarrow Table, adding string key-value metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = (table_or_df if isinstance(table_or_df, pa.Table)
             else pa.Table.from_pandas(table_or_df, preserve_index=False))
    if metadata:
        table = table.replace_schema_metadata(_merged_metadata(table.schema, metadata))
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _merged_metadata(schema: Any, metadata: dict[str, Any]) -> dict[bytes, bytes]:
    """``schema``'s key-value metadata (e.g. pandas') followed by ``metadata`` as strings."""
    merged = dict(schema.metadata or {})
    merged.update({k.encode(): str(v).encode() for k, v in metadata.items()})
    return merged


class ParquetRowGroups:
    """Appends tables of one schema to an open Parquet file, one row group per ``row_group_rows`` rows."""

    def __init__(self, writer: Any, row_group_rows: int):
        self._writer, self._row_group_rows = writer, row_group_rows
        self._pending: list[Any] = []
        self._pending_rows = 0
        self.rows = 0

    def write(self, table: Any) -> None:
        # Small batches are held back so the file is not thousands of tiny row groups; at most one group in memory.
        self._pending.append(table)
        self._pending_rows += table.num_rows
        self.rows += table.num_rows
        if self._pending_rows >= self._row_group_rows:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa

        if self._pending:
            self._writer.write_table(pa.concat_tables(self._pending), row_group_size=max(self._pending_rows, 1))
        self._pending, self._pending_rows = [], 0


@contextlib.contextmanager
def streaming_parquet(path: str | os.PathLike, schema: Any, metadata: dict[str, Any] | None = None,
                      row_group_rows: int = 16384) -> Iterator[ParquetRowGroups]:
    """Yield a writer that appends tables of ``schema`` to ``path`` as they come (``.write(table)``).

    The file is written under a temporary name in the same folder and renamed onto ``path`` only when the block ends
    without an error, so a failure half-way leaves no file. ``metadata`` is added as string key-value metadata, as
    :func:`write_parquet` does: the file is the same as one written whole."""
    import pyarrow.parquet as pq

    if metadata:
        schema = schema.with_metadata(_merged_metadata(schema, metadata))
    with atomic_path(path) as tmp:
        writer = pq.ParquetWriter(tmp, schema)
        try:
            groups = ParquetRowGroups(writer, row_group_rows)
            yield groups
            groups.flush()
        finally:
            writer.close()


def save_figure(path: str | os.PathLike, fig: Any, dpi: int = 110) -> None:
    """Save a matplotlib figure atomically and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)
