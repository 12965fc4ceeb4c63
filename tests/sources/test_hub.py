"""Biology photo sources on the Hugging Face Hub (ssl4sci.sources.hub: VLM4Bio, TreeOfLife-10M, Rare Species), fully
offline.

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
from pathlib import Path

import pandas as pd
import pytest
from conftest import (
    _read,
    default_section,
    photo_bytes,
    rare_species_repo,
    rare_species_rows,
    tar_gz,
    treeoflife_cfg,
    treeoflife_repo,
    vlm4bio_repo,
)

from ssl4sci.config import ConfigError, validate_config
from ssl4sci.sources.hub import SourceError, fetch_rare_species, fetch_treeoflife, fetch_vlm4bio
from ssl4sci.sources.raw_layout import BASE_COLUMNS

# --------------------------------------------------------------------------- fixture helpers

def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


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
