"""Downloads that go wrong: each ends complete and verified, resumable, or in one line that says what to do.

Everything runs against servers on 127.0.0.1 built here, through the real clients: urllib for archives
(``archive.download_file``) and huggingface_hub for the Hub (pointed at a local endpoint by patching its
``constants``, which it reads at import time). tests/sources/test_hub.py and tests/sources/test_archive.py cover
the happy paths, a part file written by hand, a single dropped connection and Hub errors built in memory; these cover
interrupted runs across invocations, corrupted partial files, refusals, rate limits, a full disk and the Hub's own
HTTP answers.
"""
from __future__ import annotations

import errno
import hashlib
import importlib
import io
import json
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from conftest import default_section

from ssl4sci.cli import main
from ssl4sci.sources import archive
from ssl4sci.sources.archive import SourceError, download_file


class Server:
    """Serves ``files`` with HTTP Range support; can cut every body short, ignore Range, or answer a status."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.cut_after: int | None = None  # body bytes sent before hanging up, on every request
        self.ignore_range = False
        self.answers: list[tuple[int, dict]] = []  # (status, headers) answered first, one per request
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, body: bool) -> None:
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                if server.answers:
                    status, headers = server.answers.pop(0)
                    return self._empty(status, headers)
                data = server.files.get(self.path)
                if data is None:
                    return self._empty(404, {})
                start = int(rng.split("=")[1].split("-")[0]) if rng and not server.ignore_range else 0
                if start >= len(data) > 0:
                    return self._empty(416, {"Content-Range": f"bytes */{len(data)}"})
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if body:
                    self.wfile.write(data[start:][: server.cut_after])  # [:None] = all of it
                    self.close_connection = server.cut_after is not None

            def _empty(self, status: int, headers: dict) -> None:
                self.send_response(status)
                for key, value in {**headers, "Content-Length": "0"}.items():
                    self.send_header(key, value)
                self.end_headers()

            def do_GET(self):  # noqa: N802 - http.server API
                self._reply(body=True)

            def do_HEAD(self):  # noqa: N802
                self._reply(body=False)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def ranges(self) -> list[str | None]:
        return [rng for _, rng in self.requests]


@pytest.fixture
def server(no_proxy):
    srv = Server()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def _payload(n: int = 200_000, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).bytes(n)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _closed_port_url() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there: connection refused, as on a machine without network
    return f"http://127.0.0.1:{port}/f.tgz"


# --------------------------------------------------------------------------- interrupted transfers

def test_a_transfer_that_keeps_dropping_resumes_where_it_stopped_run_after_run(tmp_path, server):
    payload = _payload()
    server.files["/big.tgz"] = payload
    server.cut_after = 60_000
    dest, part = tmp_path / "big.tgz", tmp_path / "big.tgz.part"
    url = server.base + "/big.tgz"
    with pytest.raises(SourceError) as err:
        download_file(url, dest, sha256=_sha(payload), retries=2, retry_wait=0)
    assert str(err.value) == (f"{url}: download failed after 3 attempts (ConnectionError: connection closed after "
                              f"60000 of 80000 bytes); 180000 bytes kept in big.tgz.part, run again to resume")
    assert part.read_bytes() == payload[:180_000] and not dest.exists()  # each attempt appended its share

    server.cut_after = None  # the network is back: the next run asks for the rest only
    info = download_file(url, dest, sha256=_sha(payload), retry_wait=0)
    assert server.ranges() == [None, "bytes=60000-", "bytes=120000-", "bytes=180000-"]
    assert dest.read_bytes() == payload and not part.exists()
    assert (info["resumed_from"], info["bytes"], info["reused"]) == (180_000, len(payload), False)


def test_a_server_that_ignores_range_after_a_drop_gets_the_part_file_rewritten(tmp_path, server):
    payload = _payload(seed=1)
    server.files["/f.tgz"] = payload
    server.cut_after = 50_000
    dest = tmp_path / "f.tgz"
    with pytest.raises(SourceError, match="50000 bytes kept in f.tgz.part, run again to resume"):
        download_file(server.base + "/f.tgz", dest, sha256=_sha(payload), retries=0)
    server.cut_after, server.ignore_range = None, True
    download_file(server.base + "/f.tgz", dest, sha256=_sha(payload))  # 200 to "bytes=50000-": starts over
    assert server.ranges() == [None, "bytes=50000-"]
    assert dest.read_bytes() == payload  # not the first 50000 bytes twice


def test_a_corrupted_part_file_fails_the_checksum_leaves_no_file_and_the_next_run_starts_over(tmp_path, server):
    payload = _payload(seed=2)
    server.files["/f.tgz"] = payload
    dest, part = tmp_path / "f.tgz", tmp_path / "f.tgz.part"
    part.write_bytes(_payload(70_000, seed=99))  # left by a run against an older version of the file
    url = server.base + "/f.tgz"
    with pytest.raises(SourceError) as err:
        download_file(url, dest, sha256=_sha(payload))
    got = _sha(_payload(70_000, seed=99) + payload[70_000:])
    assert str(err.value) == (f"{url}: sha256 mismatch (expected {_sha(payload)}, got {got}); the partial download "
                              "was deleted: check the URL and the configured sha256")
    assert list(tmp_path.iterdir()) == []
    download_file(url, dest, sha256=_sha(payload))
    assert server.ranges() == ["bytes=70000-", None] and dest.read_bytes() == payload


def test_a_corrupted_finished_file_is_fetched_again(tmp_path, server):
    payload = _payload(seed=3)
    server.files["/f.tgz"] = payload
    dest = tmp_path / "f.tgz"
    dest.write_bytes(payload[:-1] + b"!")  # e.g. a bit flip on disk
    info = download_file(server.base + "/f.tgz", dest, sha256=_sha(payload))
    assert dest.read_bytes() == payload and not info["reused"] and server.ranges() == [None]


# --------------------------------------------------------------------------- refusals and no network

def test_offline_names_the_fix_and_a_copy_put_in_place_is_used(tmp_path):
    url, dest = _closed_port_url(), tmp_path / "f.tgz"
    with pytest.raises(SourceError) as err:
        download_file(url, dest, sha256=_sha(b"archive"), retries=1, retry_wait=0)
    message = str(err.value)
    assert message.startswith(f"{url}: cannot download (URLError: <urlopen error [Errno {errno.ECONNREFUSED}] ")
    assert message.endswith(f"after 2 attempts: check the network connection and the URL, or put a copy of the file "
                            f"at {dest}") and "\n" not in message
    assert list(tmp_path.iterdir()) == []
    dest.write_bytes(b"archive")  # copied over from a machine with network: checked, no request made
    assert download_file(url, dest, sha256=_sha(b"archive"))["reused"]


@pytest.mark.parametrize(("status", "reason", "expected"), [
    (401, "Unauthorized", "the server refused the download (it may need a login, or the link has expired); "
                          "fetch the file yourself and put it at {dest}"),
    (403, "Forbidden", "the server refused the download (it may need a login, or the link has expired); "
                       "fetch the file yourself and put it at {dest}"),
    (404, "Not Found", "check the URL"),
])
def test_refusals_are_one_line_and_not_retried(tmp_path, server, status, reason, expected):
    server.answers = [(status, {})]
    dest = tmp_path / "f.tgz"
    with pytest.raises(SourceError) as err:
        download_file(server.base + "/f.tgz", dest, retries=3, retry_wait=0)
    sep = ":" if status != 404 else ";"
    assert str(err.value) == f"{server.base}/f.tgz: HTTP {status} {reason}{sep} {expected.format(dest=dest)}"
    assert len(server.requests) == 1 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("status", [429, 503])
def test_rate_limits_and_server_errors_are_retried(tmp_path, server, status):
    payload = _payload(1000)
    server.files["/f.tgz"] = payload
    server.answers = [(status, {"Retry-After": "0"})] * 2
    download_file(server.base + "/f.tgz", tmp_path / "f.tgz", sha256=_sha(payload), retries=2, retry_wait=0)
    assert len(server.requests) == 3 and (tmp_path / "f.tgz").read_bytes() == payload
    server.answers = [(status, {})] * 3
    with pytest.raises(SourceError, match=rf"cannot download \(ConnectionError: HTTP {status} .*\) after 3 attempts"):
        download_file(server.base + "/f.tgz", tmp_path / "g.tgz", retries=2, retry_wait=0)


def test_a_full_disk_is_not_retried_and_keeps_the_part_for_later(tmp_path, server, monkeypatch):
    payload = _payload(3 << 20)  # three of download_file's 1 MiB blocks
    server.files["/f.tgz"] = payload
    real_open = open

    class FillsUp(io.FileIO):
        """The second block meets a full disk: half of it lands, then ENOSPC."""

        def write(self, block):
            if self.tell() >= 1 << 20:
                super().write(block[: len(block) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super().write(block)

    monkeypatch.setattr(archive, "open", lambda path, mode="r": FillsUp(path, mode.replace("b", "")) if "b" in mode
                        else real_open(path, mode), raising=False)
    part = tmp_path / "f.tgz.part"
    with pytest.raises(OSError) as err:
        download_file(server.base + "/f.tgz", tmp_path / "f.tgz", sha256=_sha(payload), retries=3, retry_wait=0)
    assert (err.value.errno, err.value.filename) == (errno.ENOSPC, str(part))
    assert len(server.requests) == 1 and part.stat().st_size == (1 << 20) + (1 << 19)
    monkeypatch.undo()  # space freed: the next run resumes from the part file
    download_file(server.base + "/f.tgz", tmp_path / "f.tgz", sha256=_sha(payload))
    assert server.ranges()[-1] == f"bytes={(1 << 20) + (1 << 19)}-" and (tmp_path / "f.tgz").read_bytes() == payload


# --------------------------------------------------------------------------- the Hugging Face Hub, over HTTP

@pytest.fixture
def hub(server, tmp_path, monkeypatch):
    """The real huggingface_hub client talking to the local server (it reads its endpoint at import time)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", server.base)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        server.base + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    http = importlib.import_module("huggingface_hub.utils._http")
    if hasattr(http, "time"):  # the client backs off between retries of 429 and 5xx; skip the waiting
        monkeypatch.setattr(http.time, "sleep", lambda seconds: None)
    return server


HUB_ANSWERS = [
    ("gated", 401, {"X-Error-Code": "GatedRepo"},
     "{repo} is gated: accept its terms at https://huggingface.co/datasets/{repo} and set HF_TOKEN"),
    ("repo not found", 404, {"X-Error-Code": "RepoNotFound"},
     "{repo}: dataset repository not found on the Hugging Face Hub: check {section}.repo_id (for a private "
     "repository, set HF_TOKEN)"),
    ("revision not found", 404, {"X-Error-Code": "RevisionNotFound"},
     "{repo}: revision '{rev}' not found on the Hugging Face Hub: set {section}.revision to an existing commit, "
     "branch or tag"),
    ("bad token", 401, {"X-Error-Message": "Invalid credentials in Authorization header"},
     "{repo}: the Hugging Face Hub rejected the token in HF_TOKEN (HTTP 401): set HF_TOKEN to a valid token from "
     "https://huggingface.co/settings/tokens, or unset it for public data"),
    ("forbidden", 403, {},
     "{repo}: the Hugging Face Hub denied access (HTTP 403): give the token in HF_TOKEN read access to {repo} "
     "(a fine-grained token needs 'public gated repositories'), or set {section}.local_path to a downloaded copy"),
    ("rate limited", 429, {},
     "{repo}: the Hugging Face Hub is rate-limiting this machine (HTTP 429): wait a few minutes and run again "
     "(HF_TOKEN raises the limit), or set {section}.local_path to a downloaded copy"),
    ("server error", 503, {},
     "{repo}: the Hugging Face Hub failed (HTTP 503): run again later, or set {section}.local_path to a downloaded "
     "copy"),
]
SOURCES = [("rare_species", "imageomics/rare-species", "06e9eae09355d6e6e1b954ee3f54a4247a4d6fcb"),  # snapshot_download
           ("treeoflife", "imageomics/TreeOfLife-10M", "217ae7deafd3b07f3549ad6542f87ae3cf8c31bd")]  # hf_hub_download


@pytest.mark.parametrize(("case", "status", "headers", "expected"), HUB_ANSWERS, ids=[a[0] for a in HUB_ANSWERS])
@pytest.mark.parametrize(("section", "repo", "rev"), SOURCES, ids=[s[0] for s in SOURCES])
def test_hub_answers_are_one_actionable_line(hub, tmp_path, capsys, monkeypatch, case, status, headers, expected,
                                             section, repo, rev):
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    hub.answers = [(status, headers)] * 20  # every request, retries included
    out = tmp_path / "raw"
    cfg = json.dumps(default_section(section))  # the section a job receives; the schema pins the revision
    assert main(["fetch", "--source", section, "--cfg", cfg, "--out", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert err == [f"ssl4sci fetch: error: {expected.format(repo=repo, rev=rev, section=section)}"]
    assert any(p.startswith((f"/api/datasets/{repo}/", f"/datasets/{repo}/")) for p, _ in hub.requests)  # no internet
    assert not (out / "metadata.parquet").exists()


def test_hub_file_missing_at_the_revision_names_the_file(hub, tmp_path, capsys):
    hub.answers = [(404, {"X-Error-Code": "EntryNotFound"})] * 5
    cfg = json.dumps(default_section("treeoflife", revision="v2"))
    args = ["fetch", "--source", "treeoflife", "--cfg", cfg, "--out", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == ("ssl4sci fetch: error: imageomics/TreeOfLife-10M@v2: file 'metadata/catalog.csv' not found on the "
                   "Hugging Face Hub: check treeoflife.revision (the file may not exist at that revision)")
