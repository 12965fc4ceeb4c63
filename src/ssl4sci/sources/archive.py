"""Resumable, checksum-verified download of one archive over HTTP(S), and selective extraction.

Used for data that is not on the Hugging Face Hub (the CUB-200-2011 bird images that VLM4Bio
points to). The download goes to ``<dest>.part``; an interrupted run leaves the part file, and
the next run asks the server for the rest (HTTP ``Range: bytes=<size>-``). A server that ignores
the range (answers 200) is handled by starting over. The whole file is hashed (sha256) before it
is renamed to ``dest``, so ``dest`` only ever exists complete and verified; a mismatch deletes the
part file and raises :class:`SourceError` naming both hashes. A full disk is no network fault: it is not
retried but raised at once (``OSError`` ENOSPC naming the part file, which stays for the next run to resume).

The HTTP client is injectable (``url_opener(url, headers) -> response``, the response behaving
like :func:`urllib.request.urlopen`'s: ``.status``, ``.headers.get``, ``.read(n)``, ``.close``),
so tests exercise the whole path against a local server.
"""
from __future__ import annotations

import http.client
import os
import re
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

from ssl4sci.io import DISK_FULL_ERRNOS, atomic_path, file_sha256

__all__ = ["SourceError", "download_file", "extract_flat"]

_CHUNK = 1 << 20
_USER_AGENT = "ssl4sci-fetch/0.1"


class SourceError(ValueError):
    """A data source cannot be fetched; the message is one line naming what and what to do.

    Shared by every photo source (Hub datasets, archives, local folders)."""


UrlOpener = Callable[[str, dict], Any]


def _default_opener(url: str, headers: dict, timeout: float = 60.0) -> Any:
    request = urllib.request.Request(url, headers=headers)
    return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - the URL comes from the config


def _status(response: Any) -> int:
    status = getattr(response, "status", None)
    if status is None:
        status = response.getcode()
    return int(status)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def download_file(url: str, dest: str | os.PathLike, *, sha256: str | None = None,
                  url_opener: UrlOpener | None = None, retries: int = 3, retry_wait: float = 2.0) -> dict:
    """Download ``url`` to ``dest`` (resuming ``dest.part``); verify ``sha256`` when given.

    Returns ``{"path", "sha256", "bytes", "resumed_from", "reused"}``. An existing ``dest`` whose
    hash matches is reused without any request; one that does not match is deleted and fetched
    again. Network failures mid-transfer are retried ``retries`` times (waiting ``retry_wait`` s,
    doubling), each resuming from what the part file already holds; a failure after that leaves
    the part file for the next run.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    opener = url_opener or _default_opener
    expected = sha256.lower() if sha256 else None
    if expected is not None and not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise SourceError(f"{url}: expected a 64-hex-digit sha256, got {sha256!r}")

    if dest.exists():
        digest = file_sha256(dest)
        if expected is None or digest == expected:
            return {"path": str(dest), "sha256": digest, "bytes": dest.stat().st_size,
                    "resumed_from": 0, "reused": True}
        dest.unlink()  # stale or corrupted: fetch again

    resumed_from = part.stat().st_size if part.exists() else 0
    attempt = 0
    while True:
        attempt += 1
        try:
            _transfer(url, part, opener)
            break
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, timeout, body cut short
            if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:  # our disk, not the network: no retry
                raise OSError(exc.errno, os.strerror(exc.errno), str(part)) from exc
            if attempt > retries:
                raise SourceError(_gave_up(url, dest, part, attempt, exc)) from exc
            time.sleep(retry_wait * 2 ** (attempt - 1))

    digest = file_sha256(part)
    if expected is not None and digest != expected:
        part.unlink(missing_ok=True)
        raise SourceError(f"{url}: sha256 mismatch (expected {expected}, got {digest}); the partial download "
                          f"was deleted: check the URL and the configured sha256")
    os.replace(part, dest)
    return {"path": str(dest), "sha256": digest, "bytes": dest.stat().st_size,
            "resumed_from": resumed_from, "reused": False}


def _gave_up(url: str, dest: Path, part: Path, attempts: int, exc: BaseException) -> str:
    size = part.stat().st_size if part.exists() else 0
    if size:
        return (f"{url}: download failed after {attempts} attempts ({_one_line(exc)}); "
                f"{size} bytes kept in {part.name}, run again to resume")
    return (f"{url}: cannot download ({_one_line(exc)}) after {attempts} attempts: check the network connection "
            f"and the URL, or put a copy of the file at {dest}")


def _transfer(url: str, part: Path, opener: UrlOpener) -> None:
    """Append the missing bytes of ``url`` to ``part`` (or rewrite it when the server sends it whole)."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = opener(url, headers)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # range starts at/after the end: the part file is already whole
            exc.close()
            return
        if exc.code >= 500 or exc.code == 429:  # server trouble or rate limit: retried like a dropped connection
            raise ConnectionError(f"HTTP {exc.code} {exc.reason}") from exc
        if exc.code in (401, 403):
            dest = part.with_name(part.name.removesuffix(".part"))
            raise SourceError(f"{url}: HTTP {exc.code} {exc.reason}: the server refused the download (it may need a "
                              f"login, or the link has expired); fetch the file yourself and put it at {dest}") from exc
        raise SourceError(f"{url}: HTTP {exc.code} {exc.reason}; check the URL") from exc
    try:
        status = _status(response)
        if status == 416 and offset:
            return
        if status not in (200, 206):
            raise SourceError(f"{url}: HTTP {status}; check the URL")
        mode = "ab"
        if offset and status == 206:
            content_range = response.headers.get("Content-Range") or ""
            m = re.match(r"bytes\s+(\d+)-", content_range)
            start = int(m.group(1)) if m else -1
            if start == 0:
                mode = "wb"
            elif start != offset:
                raise SourceError(f"{url}: server answered range {content_range!r} to a request from byte "
                                  f"{offset}; delete {part} and run again")
        elif offset:
            mode = "wb"  # 200 to a range request: the server ignored it and sends the whole file
        length = response.headers.get("Content-Length")
        received = 0
        with open(part, mode) as fh:
            for block in iter(lambda: response.read(_CHUNK), b""):
                fh.write(block)
                received += len(block)
            fh.flush()
            os.fsync(fh.fileno())
        # urllib's read(n) returns short data, without an error, when the server hangs up early.
        if length is not None and length.isdigit() and received < int(length):
            raise ConnectionError(f"connection closed after {received} of {length} bytes")
    finally:
        response.close()


def extract_flat(archive: str | os.PathLike, dest_dir: str | os.PathLike,
                 select: Callable[[str], bool], *, what: str = "archive") -> dict[str, Path]:
    """Stream through a (compressed) tar and write the regular members ``select(name)`` accepts
    into ``dest_dir`` under their base names (folders flattened). Returns ``{basename: path}``.

    Two selected members with the same base name are an error naming both. A target that already
    exists with the member's size is kept (re-runs do not rewrite); each file is written to a
    temporary name and renamed (``io.atomic_path``), so no half-written image is ever left, under either name.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    origin: dict[str, str] = {}
    try:
        with tarfile.open(archive, mode="r|*") as tar:
            for member in tar:
                if not member.isfile() or not select(member.name):
                    continue
                base = os.path.basename(member.name)
                if not base or base in (".", ".."):
                    continue
                if base in origin:
                    raise SourceError(f"{what}: two images named {base!r} ({origin[base]} and {member.name}); "
                                      f"cannot flatten them into one folder")
                origin[base] = member.name
                target = dest_dir / base
                if target.exists() and target.stat().st_size == member.size:
                    written[base] = target
                    continue
                src = tar.extractfile(member)
                if src is None:
                    continue
                with atomic_path(target) as tmp, open(tmp, "wb") as fh:
                    for block in iter(lambda: src.read(_CHUNK), b""):
                        fh.write(block)
                written[base] = target
    except (tarfile.TarError, EOFError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            raise  # writing the images failed, not reading the archive: deleting it would not help
        raise SourceError(f"{what}: cannot read {archive} ({_one_line(exc)}); delete it and run again") from exc
    return written
