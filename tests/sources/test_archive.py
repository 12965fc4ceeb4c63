"""Resumable, checksummed downloads (ssl4sci.sources.archive), from a real HTTP server on 127.0.0.1."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from ssl4sci.sources import archive
from ssl4sci.sources.archive import SourceError


def test_download_resumes_an_interrupted_part_file(tmp_path, server):
    payload = np.random.default_rng(0).bytes(300_000)
    server.files["/big.tgz"] = payload
    dest = tmp_path / "dl" / "big.tgz"
    dest.parent.mkdir()
    half = len(payload) // 2
    (tmp_path / "dl" / "big.tgz.part").write_bytes(payload[:half])
    info = archive.download_file(server.base + "/big.tgz", dest, sha256=hashlib.sha256(payload).hexdigest())
    assert server.requests == [("/big.tgz", f"bytes={half}-")]
    assert dest.read_bytes() == payload and not (tmp_path / "dl" / "big.tgz.part").exists()
    assert info["resumed_from"] == half and not info["reused"]
    # already complete and verified: no request at all
    again = archive.download_file(server.base + "/big.tgz", dest, sha256=hashlib.sha256(payload).hexdigest())
    assert again["reused"] and len(server.requests) == 1


def test_download_resumes_after_the_connection_drops_mid_transfer(tmp_path, server):
    payload = np.random.default_rng(2).bytes(200_000)
    server.files["/cut.tgz"] = payload
    server.cut_after["/cut.tgz"] = 70_000
    opened: list[tuple[str, dict]] = []

    def opener(url, headers):  # an injected opener: records, then uses the real urllib client
        opened.append((url, dict(headers)))
        return archive._default_opener(url, headers)

    dest = tmp_path / "cut.tgz"
    info = archive.download_file(server.base + "/cut.tgz", dest, sha256=hashlib.sha256(payload).hexdigest(),
                                 url_opener=opener, retry_wait=0)
    assert dest.read_bytes() == payload and info["resumed_from"] == 0
    assert [r[1] for r in server.requests] == [None, "bytes=70000-"]
    assert [h.get("Range") for _, h in opened] == [None, "bytes=70000-"]


def test_download_starts_over_when_the_server_ignores_range(tmp_path, server):
    payload = np.random.default_rng(1).bytes(100_000)
    server.files["/f.tgz"] = payload
    server.ignore_range = True
    dest = tmp_path / "f.tgz"
    (tmp_path / "f.tgz.part").write_bytes(b"x" * 1000)  # stale bytes that must not be kept
    archive.download_file(server.base + "/f.tgz", dest, sha256=hashlib.sha256(payload).hexdigest())
    assert server.requests == [("/f.tgz", "bytes=1000-")]
    assert dest.read_bytes() == payload


def test_download_part_already_whole_and_http_errors(tmp_path, server):
    payload = b"complete archive bytes"
    server.files["/w.tgz"] = payload
    (tmp_path / "w.tgz.part").write_bytes(payload)  # interrupted just before the rename
    archive.download_file(server.base + "/w.tgz", tmp_path / "w.tgz", sha256=hashlib.sha256(payload).hexdigest())
    assert (tmp_path / "w.tgz").read_bytes() == payload  # the 416 answer is taken as "already whole"
    with pytest.raises(SourceError, match=r"HTTP 404"):
        archive.download_file(server.base + "/missing.tgz", tmp_path / "m.tgz")
