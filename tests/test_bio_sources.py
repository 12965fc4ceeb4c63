"""Biology photo sources (VLM4Bio, TreeOfLife-10M, Rare Species, local folders), fully offline.

Fixture repositories are built in the exact Hub layouts with tiny 8x8 images; the Hub is replaced by
an injected downloader that copies from the fixture tree with the same contract as
``snapshot_download`` / ``hf_hub_download`` (honouring allow_patterns with fnmatch). The CUB
archive is served by a real HTTP server on 127.0.0.1. Error paths use the real huggingface_hub
exception classes, and the real client pointed at a closed port or put in offline mode.
"""
from __future__ import annotations

import fnmatch
import hashlib
import importlib
import json
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import (
    default_section,
    photo_bytes,
    rare_species_repo,
    rare_species_rows,
    tar_gz,
    treeoflife_cfg,
    treeoflife_repo,
    vlm4bio_repo,
    write_photo,
)

from ssl4sci.config import ConfigError, validate_config
from ssl4sci.sources import archive
from ssl4sci.sources.hub import SourceError, fetch_rare_species, fetch_treeoflife, fetch_vlm4bio
from ssl4sci.sources.image_folder import read_image_folder
from ssl4sci.sources.raw_layout import BASE_COLUMNS

RANKS = ["kingdom", "phylum", "class", "order", "family", "genus", "species"]


# --------------------------------------------------------------------------- fixture helpers

def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _read(out: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    meta = pd.read_parquet(out / "metadata.parquet")
    rejects = pd.read_parquet(out / "rejects.parquet")
    prov = json.loads((out / "provenance.json").read_text())
    return meta, rejects, prov


def _hub_error(name: str, message: str, status: int = 404) -> Exception:
    """A real huggingface_hub exception, constructed as the client does (with an HTTP response)."""
    from huggingface_hub import errors

    cls = getattr(errors, name)
    url = "https://huggingface.co/datasets/imageomics/x/resolve/main/f"
    http_module = importlib.import_module(errors.HfHubHTTPError.__mro__[1].__module__.split(".")[0])
    if http_module.__name__ == "requests":  # huggingface_hub < 1.0
        response = http_module.Response()
        response.status_code = status
        response.url = url
        response.request = http_module.Request("GET", url).prepare()
    else:  # httpx / httpx2 based clients
        response = http_module.Response(status, request=http_module.Request("GET", url))
    return cls(message, response=response)


def _entry_not_found(message: str) -> Exception:
    from huggingface_hub import errors

    name = "RemoteEntryNotFoundError" if hasattr(errors, "RemoteEntryNotFoundError") else "EntryNotFoundError"
    return _hub_error(name, message)


class FakeHub:
    """Serves one fixture repository tree with the snapshot_download / hf_hub_download contracts."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.calls: list[tuple] = []

    def snapshot_download(self, repo_id, *, repo_type=None, revision=None, allow_patterns=None,
                          local_dir=None, token=None, **kwargs):
        assert repo_type == "dataset" and token is None and local_dir is not None
        self.calls.append(("snapshot", repo_id, revision, tuple(allow_patterns or ())))
        patterns = [allow_patterns] if isinstance(allow_patterns, str) else allow_patterns
        for src in sorted(self.root.rglob("*")):
            rel = src.relative_to(self.root).as_posix()
            if src.is_file() and (patterns is None or any(fnmatch.fnmatch(rel, p) for p in patterns)):
                dst = Path(local_dir) / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
        return str(local_dir)

    def hf_hub_download(self, repo_id, filename, *, repo_type=None, revision=None, local_dir=None,
                        token=None, **kwargs):
        assert repo_type == "dataset" and token is None and local_dir is not None
        self.calls.append(("file", repo_id, revision, filename))
        src = self.root / filename
        if not src.is_file():
            raise _entry_not_found(f"404 Client Error. Entry Not Found for url: {filename}")
        dst = Path(local_dir) / filename
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        return str(dst)

    def files(self) -> list[str]:
        return [c[3] for c in self.calls if c[0] == "file"]


def _never_called(*args, **kwargs):
    raise AssertionError(f"the downloader must not be called (args {args})")


# --------------------------------------------------------------------------- local HTTP server

class _Server:
    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.ignore_range = False
        self.cut_after: dict[str, int] = {}  # path -> bytes sent before dropping the connection (once)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server API
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                data = server.files.get(self.path)
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = 0
                if rng and not server.ignore_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cut = server.cut_after.pop(self.path, None)
                if cut is not None:  # promise the whole body, send part of it, hang up
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(no_proxy):
    srv = _Server()
    yield srv
    srv.close()


# --------------------------------------------------------------------------- VLM4Bio fixtures

CUB_IMAGES = {
    "CUB_200_2011/images/001.Black_footed_Albatross/Black_Footed_Albatross_0001_796111.jpg": 11,
    "CUB_200_2011/images/001.Black_footed_Albatross/Black_Footed_Albatross_0002_55.jpg": 12,
    "CUB_200_2011/images/002.Laysan_Albatross/Laysan_Albatross_0001_545.jpg": 13,
}


def _cub_archive() -> bytes:
    members = {name: photo_bytes(v) for name, v in CUB_IMAGES.items()}
    members["CUB_200_2011/README"] = b"CUB-200-2011\n"
    members["CUB_200_2011/attributes/certainties.txt"] = b"1 not visible\n"
    return tar_gz(members)


def _bird_repo(root: Path) -> Path:
    meta = root / "datasets" / "Bird" / "metadata"
    meta.mkdir(parents=True)
    pd.DataFrame({
        "fileNameAsDelivered": ["Black_Footed_Albatross_0001_796111.jpg", "Laysan_Albatross_0001_545.jpg",
                                "Black_Footed_Albatross_0002_55.jpg", "Sooty_Albatross_0001_1.jpg"],
        "scientificName": ["Phoebastria nigripes", "Phoebastria immutabilis", "", "Phoebetria fusca"],
    }).to_csv(meta / "bird_metadata_10k.csv", index=False)  # the Bird spelling
    return root


# --------------------------------------------------------------------------- VLM4Bio tests

def test_vlm4bio_downloads_flattens_chunks_and_rejects(tmp_path):
    fake = FakeHub(vlm4bio_repo(tmp_path / "repo"))
    out = tmp_path / "raw"
    prov = fetch_vlm4bio(default_section("vlm4bio", groups=["Fish", "Butterfly"], revision="abc123"), out,
                         downloader=fake.snapshot_download)
    meta, rejects, saved = _read(out)
    assert saved == json.loads(json.dumps(prov))

    assert list(meta.columns) == [*BASE_COLUMNS, "group", "file_name"]
    assert list(meta["id"]) == ["Fish/INHS_FISH_001.jpg", "Fish/INHS_FISH_002.jpg",
                                "Butterfly/CAM016154_d.png", "Butterfly/CAM016155_v.png"]
    assert list(meta["label"]) == ["Notropis atherinoides", "Lepomis macrochirus",
                                   "Heliconius erato", "Heliconius melpomene"]
    assert list(meta["species"]) == list(meta["label"])
    assert list(meta["genus"]) == ["Notropis", "Lepomis", "Heliconius", "Heliconius"]
    assert list(meta["source"]) == ["vlm4bio/Fish"] * 2 + ["vlm4bio/Butterfly"] * 2
    assert set(meta.loc[meta.group == "Butterfly", "order"]) == {"Lepidoptera"}
    assert meta.loc[meta.group == "Fish", "class"].isna().all()
    for _, row in meta.iterrows():
        p = Path(row["path"])
        assert p.is_absolute() and p.is_file()
        assert p.parent == out / "hub" / "datasets" / row["group"] / "images"

    # chunk folders are gone (flattened), both at group level and under images/
    assert not list((out / "hub" / "datasets").rglob("chunk_*"))
    assert sorted(p.name for p in (out / "hub/datasets/Fish/images").iterdir()) == [
        "INHS_FISH_001.jpg", "INHS_FISH_002.jpg", "INHS_FISH_003.jpg"]
    # only what the patterns allow was fetched
    assert not (out / "hub" / "datasets/Fish/metadata/identification_matrix.csv").exists()
    assert not (out / "hub" / "license-metadata").exists() and not (out / "hub" / "README.md").exists()
    assert fake.calls[0][2] == "abc123"
    assert "datasets/Fish/chunk_*/*" in fake.calls[0][3]

    assert sorted(zip(rejects["id"], rejects["reason"])) == [
        ("Fish/INHS_FISH_003.jpg", "no species name"), ("Fish/INHS_FISH_004.jpg", "image file not found")]
    assert set(rejects["stage"]) == {"fetch"}
    assert prov["counts"]["kept"] == 4 and prov["counts"]["dropped"] == 2
    assert prov["counts"]["dropped_by_reason"] == {"image file not found": 1, "no species name": 1}
    assert prov["groups"]["Fish"]["flattened"] == 3 and prov["repo_id"] == "imageomics/VLM4Bio"

    # a second run reuses the flattened download: no new Hub call, same table
    fetch_vlm4bio(default_section("vlm4bio", groups=["Fish", "Butterfly"], revision="abc123"), out,
                  downloader=fake.snapshot_download)
    assert len(fake.calls) == 2
    assert pd.read_parquet(out / "metadata.parquet").equals(meta)


def test_vlm4bio_flatten_collision_names_both_files(tmp_path):
    fake = FakeHub(vlm4bio_repo(tmp_path / "repo", collide=True))
    with pytest.raises(SourceError) as err:
        fetch_vlm4bio(default_section("vlm4bio", groups=["Fish"]), tmp_path / "raw", downloader=fake.snapshot_download)
    msg = str(err.value)
    assert "\n" not in msg and "INHS_FISH_002.jpg" in msg and "chunk_1" in msg and "images" in msg
    assert not (tmp_path / "raw" / "metadata.parquet").exists()


def test_vlm4bio_local_path_reads_chunked_copy_in_place(tmp_path):
    local = vlm4bio_repo(tmp_path / "shared" / "VLM4Bio")
    before = _files(local)
    out = tmp_path / "raw"
    prov = fetch_vlm4bio(default_section("vlm4bio", groups=["Fish", "Butterfly"], local_path=str(local)), out,
                         downloader=_never_called)
    meta, rejects, _ = _read(out)
    assert _files(local) == before  # the shared copy is never edited
    assert not (out / "hub").exists()
    assert prov["mode"] == "local_path"
    paths = dict(zip(meta["id"], meta["path"]))
    assert paths["Fish/INHS_FISH_001.jpg"] == str(local / "datasets/Fish/chunk_1/INHS_FISH_001.jpg")
    assert paths["Butterfly/CAM016155_v.png"] == str(local / "datasets/Butterfly/images/chunk_2/CAM016155_v.png")
    assert len(meta) == 4 and len(rejects) == 2


def test_vlm4bio_bird_images_from_cub_archive_over_http(tmp_path, server):
    data = _cub_archive()
    server.files["/CUB_200_2011.tgz"] = data
    fake = FakeHub(_bird_repo(tmp_path / "repo"))
    out = tmp_path / "raw"
    cfg = default_section("vlm4bio", groups=["Bird"], cub_url=server.base + "/CUB_200_2011.tgz",
                          cub_sha256=hashlib.sha256(data).hexdigest())
    prov = fetch_vlm4bio(cfg, out, downloader=fake.snapshot_download)
    meta, rejects, _ = _read(out)
    images = out / "hub" / "datasets" / "Bird" / "images"
    assert sorted(p.name for p in images.iterdir()) == sorted(Path(n).name for n in CUB_IMAGES)  # flat, images only
    assert list(meta["id"]) == ["Bird/Black_Footed_Albatross_0001_796111.jpg", "Bird/Laysan_Albatross_0001_545.jpg"]
    assert list(meta["class"]) == ["Aves", "Aves"] and list(meta["genus"]) == ["Phoebastria", "Phoebastria"]
    assert all(Path(p).parent == images for p in meta["path"])
    assert dict(zip(rejects["id"], rejects["reason"])) == {
        "Bird/Black_Footed_Albatross_0002_55.jpg": "no species name",
        "Bird/Sooty_Albatross_0001_1.jpg": "image file not found"}
    cub = prov["groups"]["Bird"]["cub"]
    assert cub["images"] == 3 and cub["sha256"] == cfg["cub_sha256"] and cub["resumed_from"] == 0
    assert [r[1] for r in server.requests] == [None]
    assert fake.calls[0][3] == ("datasets/Bird/metadata/*metadata_10k.csv",)  # bird images are not on the Hub

    fetch_vlm4bio(cfg, out, downloader=fake.snapshot_download)  # second run: nothing downloaded again
    assert len(server.requests) == 1 and len(fake.calls) == 1


def test_vlm4bio_cub_checksum_mismatch_deletes_part_file(tmp_path, server):
    server.files["/CUB_200_2011.tgz"] = _cub_archive()
    fake = FakeHub(_bird_repo(tmp_path / "repo"))
    out = tmp_path / "raw"
    cfg = default_section("vlm4bio", groups=["Bird"], cub_url=server.base + "/CUB_200_2011.tgz", cub_sha256="0" * 64)
    with pytest.raises(SourceError) as err:
        fetch_vlm4bio(cfg, out, downloader=fake.snapshot_download)
    msg = str(err.value)
    assert "\n" not in msg and "sha256 mismatch" in msg and cfg["cub_url"] in msg and "0" * 64 in msg
    downloads = out / "hub" / "downloads"
    assert not (downloads / "CUB_200_2011.tgz.part").exists() and not (downloads / "CUB_200_2011.tgz").exists()
    assert not (out / "metadata.parquet").exists()


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


# --------------------------------------------------------------------------- TreeOfLife-10M

def test_treeoflife_selects_subset_and_extracts_only_selected_members(tmp_path):
    fake = FakeHub(treeoflife_repo(tmp_path / "repo"))
    out = tmp_path / "raw"
    prov = fetch_treeoflife(treeoflife_cfg(), out, downloader=fake.hf_hub_download)
    meta, rejects, _ = _read(out)

    ravens = sorted(meta.loc[meta.label == "Corvus corax", "id"])
    assert len(ravens) == 3 and set(ravens) <= {"c1", "c2", "c3", "c4", "c5"}
    assert sorted(meta.loc[meta.label == "Pica pica", "id"]) == ["p1", "p2"]
    assert len(meta) == 5 and set(meta["species"]) == {"Corvus corax", "Pica pica"}
    assert list(meta.columns) == [*BASE_COLUMNS, "treeoflife_id", "eol_content_id", "eol_page_id", "common", "split"]
    row = meta.set_index("id").loc["p1"]
    assert (row["kingdom"], row["class"], row["family"], row["genus"], row["common"]) == (
        "Animalia", "Aves", "Corvidae", "Pica", "magpie")
    assert dict(zip(rejects["id"], rejects["reason"])) == {"g1": "no species name"}

    # only selected members were written; nothing else from the archives is on disk
    extracted = out / "hub" / "extracted" / "EOL"
    assert sorted(p.name for p in extracted.iterdir()) == sorted(f"{i}.jpg" for i in meta["id"])
    unselected = {"c1", "c2", "c3", "c4", "c5"} - set(ravens) | {"m1", "m2", "x1", "v1", "g1", "m3"}
    on_disk = {p.name.split(".")[0] for p in out.rglob("*") if p.is_file()}
    assert not on_disk & unselected
    assert all(Path(p).is_file() and Path(p).parent == extracted for p in meta["path"])

    # early stop: everything was in image_set_01/02, so 03 is never downloaded; archives are deleted
    assert fake.files() == ["metadata/catalog.csv", "dataset/EOL/image_set_01.tar.gz",
                            "dataset/EOL/image_set_02.tar.gz"]
    assert not list((out / "hub" / "dataset").rglob("*.tar.gz"))
    assert prov["stopped"] == "all selected images found"
    sel = prov["selection"]
    assert (sel["catalog_rows"], sel["after_split"], sel["after_eol_only"], sel["after_taxa"]) == (13, 12, 11, 8)
    assert sel["selected"] == 5 and prov["counts"]["kept"] == 5


def test_treeoflife_selection_is_seeded_and_local_copy_is_only_read(tmp_path):
    local = treeoflife_repo(tmp_path / "ToL")
    before = _files(local)

    def ravens(out: Path, seed: int) -> list[str]:
        fetch_treeoflife(treeoflife_cfg(seed=seed, max_per_species=2, local_path=str(local)), out,
                         downloader=_never_called)
        meta = pd.read_parquet(out / "metadata.parquet")
        return sorted(meta.loc[meta.label == "Corvus corax", "id"])

    first = ravens(tmp_path / "a", 0)
    assert ravens(tmp_path / "b", 0) == first and len(first) == 2
    assert len({tuple(ravens(tmp_path / f"s{seed}", seed)) for seed in range(1, 8)} | {tuple(first)}) > 1
    assert _files(local) == before  # archives in the shared copy are read, never deleted or changed
    prov = json.loads((tmp_path / "a" / "provenance.json").read_text())
    assert prov["mode"] == "local_path" and prov["archives_read"]


def test_treeoflife_unfound_images_counted_and_iteration_stops_at_last_archive(tmp_path):
    extra = [("train", "z1", "999", "Aves", "Corvidae", "Corvus", "corax", "common raven")]
    fake = FakeHub(treeoflife_repo(tmp_path / "repo", extra_rows=extra))
    out = tmp_path / "raw"
    prov = fetch_treeoflife(treeoflife_cfg(max_per_species=None, max_archives=10, keep_archives=True),
                            out, downloader=fake.hf_hub_download)
    meta, rejects, _ = _read(out)
    assert "z1" not in set(meta["id"]) and len(meta) == 7
    # not a bad file, so not a reject: counted in the provenance, outside prepare.max_reject_fraction
    assert "z1" not in set(rejects["id"]) and prov["selection"]["not_in_archives_read"] == 1
    assert fake.files()[-1] == "dataset/EOL/image_set_04.tar.gz"  # asked for, absent: the end of the sets
    assert prov["stopped"] == "dataset/EOL/image_set_04.tar.gz not in the repository"
    assert len(list((out / "hub" / "dataset" / "EOL").glob("*.tar.gz"))) == 3  # keep_archives

    # explicit archive list: a missing one is an error naming the file
    with pytest.raises(SourceError, match=r"image_set_07\.tar\.gz.*not found"):
        fetch_treeoflife(treeoflife_cfg(archives=[7]), tmp_path / "raw2", downloader=fake.hf_hub_download)


# --------------------------------------------------------------------------- Rare Species

def test_rare_species_from_hub_layout(tmp_path):
    fake = FakeHub(rare_species_repo(tmp_path / "repo"))
    out = tmp_path / "raw"
    prov = fetch_rare_species(default_section("rare_species"), out, downloader=fake.snapshot_download)
    meta, rejects, _ = _read(out)
    assert list(meta["id"]) == ["rs-00", "rs-01", "rs-10", "rs-20"]
    assert list(meta["label"]) == ["Acanthochelys macrocephala"] * 2 + ["Haliaeetus vociferoides", "Acropora millepora"]
    assert list(meta["species"]) == list(meta["label"]) and list(meta["genus"])[0] == "Acanthochelys"
    assert list(meta["common"])[-1] == "staghorn coral"
    assert list(meta.columns) == [*BASE_COLUMNS, "rarespecies_id", "eol_content_id", "eol_page_id", "common",
                                  "file_name"]
    assert all(Path(p).is_file() and Path(p).is_relative_to(out / "hub" / "dataset") for p in meta["path"])
    assert dict(zip(rejects["id"], rejects["reason"])) == {"rs-11": "image file not found", "rs-21": "no species name"}
    assert not (out / "hub" / "visuals").exists()  # not in allow_patterns
    assert fake.calls[0][2] == default_section("rare_species")["revision"]  # the schema pins the revision
    assert prov["metadata_file"] == "metadata.csv" and prov["images_from_parquet"] == 0


def test_rare_species_parquet_shards_and_local_copy(tmp_path):
    local = rare_species_repo(tmp_path / "shared" / "rare-species", images_as="parquet")
    before = _files(local)
    out = tmp_path / "raw"
    prov = fetch_rare_species(default_section("rare_species", local_path=str(local)), out, downloader=_never_called)
    meta, rejects, _ = _read(out)
    assert _files(local) == before
    assert list(meta["id"]) == ["rs-00", "rs-01", "rs-10", "rs-20"]
    assert prov["images_from_parquet"] == 4  # rs-21 has an image but no species name: not written out
    first = Path(meta["path"][0])
    assert first == out / "hub" / rare_species_rows()[0]["file_name"] and first.read_bytes() == photo_bytes(0)
    assert dict(zip(rejects["id"], rejects["reason"]))["rs-11"] == "image file not found"


# --------------------------------------------------------------------------- local folders

def test_image_folder_class_folders(tmp_path):
    root = tmp_path / "photos"
    write_photo(root / "cat" / "a.jpg", 1)
    write_photo(root / "cat" / "nested" / "b.png", 2)
    write_photo(root / "dog" / "c.JPG", 3)
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "dog" / "empty.jpg").write_bytes(b"")
    (root / "readme.md").write_text("top-level file")
    (root / "empty_class").mkdir()
    out = tmp_path / "raw"
    prov = read_image_folder(default_section("image_folder", path=str(root)), out)
    meta, rejects, _ = _read(out)
    assert list(meta["id"]) == ["cat/a.jpg", "cat/nested/b.png", "dog/c.JPG"]
    assert list(meta["label"]) == ["cat", "cat", "dog"]
    assert list(meta["path"]) == [str(root / "cat/a.jpg"), str(root / "cat/nested/b.png"), str(root / "dog/c.JPG")]
    assert list(meta.columns) == list(BASE_COLUMNS) and meta[RANKS].isna().all().all()
    assert dict(zip(rejects["id"], rejects["reason"])) == {"dog/empty.jpg": "empty image file"}
    assert prov["counts"]["ignored"] == {"not_an_image": 1, "outside_class_folders": 1}


def test_image_folder_csv(tmp_path):
    base = tmp_path / "set"
    write_photo(base / "imgs" / "x.jpg", 1)
    absolute = write_photo(tmp_path / "elsewhere" / "y.png", 2)
    write_photo(base / "imgs" / "w.jpg", 3)
    pd.DataFrame({
        "path": ["imgs/x.jpg", str(absolute), "imgs/missing.jpg", "imgs/w.jpg"],
        "label": ["Apis mellifera", "Bombus terrestris", "Apis mellifera", None],
        "genus": ["Apis", "Bombus", "Apis", None],
        "family": ["Apidae", "Apidae", "Apidae", None],
    }).to_csv(base / "labels.csv", index=False)
    out = tmp_path / "raw"
    read_image_folder(default_section("image_folder", csv=str(base / "labels.csv")), out)
    meta, rejects, _ = _read(out)
    assert list(meta["id"]) == ["imgs/x.jpg", str(absolute)]
    assert list(meta["path"]) == [str(base / "imgs/x.jpg"), str(absolute)]
    assert list(meta["genus"]) == ["Apis", "Bombus"] and list(meta["family"]) == ["Apidae", "Apidae"]
    assert meta["species"].isna().all() and set(meta["source"]) == {"image_folder"}
    assert dict(zip(rejects["id"], rejects["reason"])) == {"imgs/missing.jpg": "image file not found",
                                                          "imgs/w.jpg": "no label"}


def test_image_folder_bad_settings(tmp_path):
    # the config checks name the key before any job starts
    with pytest.raises(ConfigError, match=r"^config key 'image_folder\.path': expected exactly one of"):
        validate_config({"source": "image_folder", "image_folder": {"path": str(tmp_path), "csv": "x.csv"}})
    with pytest.raises(ConfigError, match=r"^config key 'image_folder\.pth': unknown key"):
        validate_config({"source": "image_folder", "image_folder": {"pth": str(tmp_path)}})
    with pytest.raises(ConfigError, match=r"^config key 'image_folder\.extensions\.0': expected text matching"):
        validate_config({"source": "image_folder", "image_folder": {"path": str(tmp_path), "extensions": ["jpg"]}})
    with pytest.raises(ConfigError, match=r"^config key 'image_folder\.csv': expected a non-empty string, got ''"):
        validate_config({"source": "image_folder", "image_folder": {"csv": ""}})
    with pytest.raises(SourceError, match=r"no image kept"):
        read_image_folder(default_section("image_folder", path=str(tmp_path)), tmp_path / "raw")


# --------------------------------------------------------------------------- errors

@pytest.mark.parametrize(("cfg", "pattern"), [
    ({"groups": ["Fish", "Cat"]}, r"^config key 'vlm4bio\.groups\.1': expected one of \['Fish', 'Butterfly', 'Bird'\]"),
    ({"groups": []}, r"^config key 'vlm4bio\.groups': expected a list with min 1 items"),
    ({"grups": ["Fish"]}, r"^config key 'vlm4bio\.grups': unknown key"),
    ({"cub_sha256": "abc"}, r"^config key 'vlm4bio\.cub_sha256': expected text matching"),
    ({"local_path": "/nonexistent/vlm4bio"},
     r"^config key 'vlm4bio\.local_path': '/nonexistent/vlm4bio' does not exist"),
    ({"cub_url": "ftp://example.org/CUB_200_2011.tgz"}, r"^config key 'vlm4bio\.cub_url': expected text matching"),
    ({"repo_id": "VLM4Bio"}, r"^config key 'vlm4bio\.repo_id': expected text matching"),
    ({"revision": " "}, r"^config key 'vlm4bio\.revision': expected text matching"),
    ({"local_path": ""}, r"^config key 'vlm4bio\.local_path': expected a non-empty string, got ''"),
])
def test_vlm4bio_config_errors(cfg, pattern):
    with pytest.raises(ConfigError, match=pattern):
        validate_config({"source": "vlm4bio", "vlm4bio": cfg})


@pytest.mark.parametrize(("cfg", "pattern"), [
    ({"cub_url": None}, r"^vlm4bio\.cub_url: Bird images are not on the Hub"),
])
def test_vlm4bio_checks_the_schema_cannot_make(tmp_path, cfg, pattern):
    with pytest.raises(SourceError, match=pattern):
        fetch_vlm4bio(default_section("vlm4bio", **cfg), tmp_path, downloader=_never_called)


@pytest.mark.parametrize(("cfg", "pattern"), [
    ({"taxa": {"klass": ["Aves"]}}, r"^config key 'treeoflife\.taxa': expected one of \['kingdom', .*got 'klass'"),
    ({"taxa": {"class": "Aves"}}, r"^config key 'treeoflife\.taxa\.class': expected array"),
    ({"max_per_species": 0}, r"^config key 'treeoflife\.max_per_species': expected >= 1"),
    ({"archives": [1, 1]}, r"^config key 'treeoflife\.archives': \[1, 1\] has non-unique elements"),
    ({"eol_only": "yes"}, r"^config key 'treeoflife\.eol_only': expected boolean"),
    ({"taxa": {"class": ["Aves", " "]}}, r"^config key 'treeoflife\.taxa\.class\.1': expected text matching"),
    ({"split": " "}, r"^config key 'treeoflife\.split': expected text matching"),
])
def test_treeoflife_config_errors(cfg, pattern):
    with pytest.raises(ConfigError, match=pattern):
        validate_config({"source": "treeoflife", "treeoflife": cfg})


def _raising(exc: Exception):
    def downloader(*args, **kwargs):
        raise exc
    return downloader


def test_gated_repo_message(tmp_path):
    exc = _hub_error("GatedRepoError", "403 Client Error. Cannot access gated repo", status=403)
    with pytest.raises(SourceError) as err:
        fetch_treeoflife(default_section("treeoflife"), tmp_path, downloader=_raising(exc))
    assert str(err.value) == ("imageomics/TreeOfLife-10M is gated: accept its terms at "
                              "https://huggingface.co/datasets/imageomics/TreeOfLife-10M and set HF_TOKEN")
    assert err.value.__cause__ is exc


@pytest.mark.parametrize(("error", "expected"), [
    ("RepositoryNotFoundError", "imageomics/rare-species: dataset repository not found on the Hugging Face Hub: "
                                "check rare_species.repo_id"),
    ("RevisionNotFoundError", "imageomics/rare-species: revision 'nope' not found on the Hugging Face Hub: "
                              "set rare_species.revision"),
])
def test_not_found_messages(tmp_path, error, expected):
    exc = _hub_error(error, "404 Client Error.\nNot found")
    with pytest.raises(SourceError) as err:
        fetch_rare_species(default_section("rare_species", revision="nope"), tmp_path, downloader=_raising(exc))
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)


def test_entry_not_found_names_the_file(tmp_path):
    fake = FakeHub(tmp_path / "empty-repo")
    with pytest.raises(SourceError) as err:
        fetch_treeoflife(default_section("treeoflife", revision="v1"), tmp_path / "raw",
                         downloader=fake.hf_hub_download)
    assert str(err.value).startswith("imageomics/TreeOfLife-10M@v1: file 'metadata/catalog.csv' not found")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return constants


def test_offline_mode_without_local_copy(tmp_path, hub_cache, monkeypatch):
    monkeypatch.setattr(hub_cache, "HF_HUB_OFFLINE", True)
    offline = ("cannot reach the Hugging Face Hub and no local copy: set {}.local_path to a downloaded copy, "
               "or go online")
    with pytest.raises(SourceError) as err:  # real snapshot_download
        fetch_rare_species(default_section("rare_species"), tmp_path / "raw")
    assert str(err.value) == "imageomics/rare-species: " + offline.format("rare_species")
    with pytest.raises(SourceError) as err:  # real hf_hub_download
        fetch_treeoflife(default_section("treeoflife"), tmp_path / "raw2")
    assert str(err.value) == "imageomics/TreeOfLife-10M: " + offline.format("treeoflife")


def test_unreachable_hub_without_local_copy(tmp_path, hub_cache, monkeypatch):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there: connection refused
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setattr(hub_cache, "ENDPOINT", endpoint)
    monkeypatch.setattr(hub_cache, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    http = importlib.import_module("huggingface_hub.utils._http")
    if hasattr(http, "time"):  # the client retries refused connections with back-off; skip the waiting
        monkeypatch.setattr(http.time, "sleep", lambda seconds: None)
    with pytest.raises(SourceError, match=r"^imageomics/VLM4Bio: cannot reach the Hugging Face Hub and no local "
                                          r"copy: set vlm4bio\.local_path"):
        fetch_vlm4bio(default_section("vlm4bio", groups=["Fish"]), tmp_path / "raw")
    with pytest.raises(SourceError, match=r"^imageomics/TreeOfLife-10M: cannot reach the Hugging Face Hub"):
        fetch_treeoflife(default_section("treeoflife"), tmp_path / "raw2")
    assert not (tmp_path / "raw" / "metadata.parquet").exists()
