"""Bad images and arrays on the real fetch -> prepare paths: each one recorded in rejects.parquet with its reason and
skipped; the stage stops in one line (writing only rejects.parquet) when they are more than
prepare.max_reject_fraction of the images; the decoders never raise anything but a reject on random bytes."""
from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import default_section, make_raw
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from ssl4sci.config import ConfigError, validate_config
from ssl4sci.io import write_npy
from ssl4sci.prepare import prepare
from ssl4sci.prepare_photos import REASON_CHARS, decode_image, prepare_photos, reject_reason
from ssl4sci.sources import deeplense as dl
from ssl4sci.sources.image_folder import read_image_folder

S = 16  # prepared image side: tiny, so a stage runs in well under a second
PHOTO_OUTPUTS = {"manifest.parquet", "shards", "stats.json", "rejects.parquet", "samples.png"}
# database=None: no example store written into the working tree
FUZZ = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def photo_cfg(**over):
    """The schema's prepare section (so max_reject_fraction is the schema default unless overridden), made tiny."""
    return default_section("prepare", **{"image_size": S, "resize_shorter": S, "shard_size": 8, "samples_per_class": 1,
                                         "workers": 1, "split": {"train": 0.5, "val": 0.25, "test": 0.25}, **over})


def lensing_cfg(**over):
    return default_section("prepare", **{"image_size": S, "shard_size": 8, "samples_per_class": 1,
                                         "split": {"train": 0.5, "val": 0.25, "test": 0.25}, **over})


def noise_photo(path: Path, seed: int, size=(24, 18), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def truncated_jpeg(path: Path) -> Path:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A few hundred bytes whose PNG header claims width x height pixels: a decompression bomb, never decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def photo_folder(root: Path, n_good: int = 6) -> Path:
    for k in range(n_good):
        noise_photo(root / "a" / f"good{k}.jpg", seed=k)
        noise_photo(root / "b" / f"good{k}.png", seed=100 + k)
    return root


def listing(folder: Path) -> set[str]:
    return set(os.listdir(folder)) if folder.exists() else set()


# --------------------------------------------------------------------------- photos: one bad file of each kind

def test_each_bad_photo_is_recorded_with_its_reason_and_skipped(tmp_path):
    root = photo_folder(tmp_path / "photos")
    bad = root / "a"
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "notes.jpg").write_text("not an image\n" * 4)
    truncated_jpeg(bad / "trunc.jpg")
    noise_photo(bad / "dot.png", seed=7, size=(1, 1))
    noise_photo(bad / "line.png", seed=8, size=(40, 1))
    png_claiming(bad / "bomb.png", 50_000, 50_000)      # over twice Image.MAX_IMAGE_PIXELS: Pillow refuses it
    png_claiming(bad / "big.png", 12_000, 12_000)       # between the limit and twice it: Pillow only warns
    noise_photo(bad / "png_named.jpg", seed=9, fmt="PNG")  # wrong extension, good content: kept
    (bad / "readme.txt").write_text("not an image extension")  # ignored by the folder reader, counted

    provenance = read_image_folder(default_section("image_folder", path=str(root)), tmp_path / "raw")
    stats = prepare_photos(tmp_path / "raw", tmp_path / "data", photo_cfg(max_reject_fraction=0.5))

    out = tmp_path / "data"
    assert listing(out) == PHOTO_OUTPUTS
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary folder left
    rejects = pd.read_parquet(out / "rejects.parquet").set_index("id")
    reason, stage = rejects["reason"].to_dict(), rejects["stage"].to_dict()
    assert set(reason) == {f"a/{n}" for n in ("empty.jpg", "notes.jpg", "trunc.jpg", "dot.png", "line.png",
                                              "bomb.png", "big.png")}
    assert (reason["a/empty.jpg"], stage["a/empty.jpg"]) == ("empty image file", "fetch")
    assert reason["a/notes.jpg"] == "UnidentifiedImageError: cannot identify image file 'notes.jpg'"
    assert reason["a/trunc.jpg"].startswith("OSError: image file is truncated")
    assert reason["a/dot.png"] == "PhotoError: image of 1x1 pixels is too small (expected at least 2 pixels a side)"
    assert reason["a/line.png"] == "PhotoError: image of 40x1 pixels is too small (expected at least 2 pixels a side)"
    assert reason["a/bomb.png"].startswith("DecompressionBombError: Image size (2500000000 pixels) exceeds limit")
    assert reason["a/big.png"].startswith(("DecompressionBombWarning: Image size (144000000 pixels)",
                                           "PhotoError: image of 12000x12000 pixels exceeds Image.MAX_IMAGE_PIXELS"))
    assert all("\n" not in r and len(r) <= REASON_CHARS and str(tmp_path) not in r for r in reason.values())
    assert set(stage.values()) == {"fetch", "prepare"}

    manifest = pd.read_parquet(out / "manifest.parquet")
    assert "a/png_named.jpg" in set(manifest["id"]) and len(manifest) == 13
    assert stats["n_rejected"] == 7 and provenance["counts"]["ignored"]["not_an_image"] == 1


def test_wrong_extension_in_a_csv_is_a_fetch_reject(tmp_path):
    root = photo_folder(tmp_path / "photos", n_good=3)
    noise_photo(root / "a" / "photo.gif", seed=1, fmt="GIF")
    rows = [{"path": f"{c}/good{k}.{'jpg' if c == 'a' else 'png'}", "label": c} for c in "ab" for k in range(3)]
    pd.DataFrame(rows + [{"path": "a/photo.gif", "label": "a"}]).to_csv(root / "photos.csv", index=False)
    read_image_folder(default_section("image_folder", csv=str(root / "photos.csv")), tmp_path / "raw")
    rejects = pd.read_parquet(tmp_path / "raw" / "rejects.parquet")
    assert rejects[["id", "reason", "stage"]].values.tolist() == [
        ["a/photo.gif", "not an image file extension", "fetch"]]


# --------------------------------------------------------------------------- the allowed reject fraction

def test_too_many_bad_photos_stop_the_stage_in_one_line_and_write_only_rejects(tmp_path):
    root = photo_folder(tmp_path / "photos", n_good=3)
    for k in range(2):
        (root / "a" / f"notes{k}.jpg").write_text("not an image")
    (root / "b" / "empty.png").write_bytes(b"")
    read_image_folder(default_section("image_folder", path=str(root)), tmp_path / "raw")
    out = tmp_path / "data"
    with pytest.raises(ValueError) as err:
        prepare_photos(tmp_path / "raw", out, photo_cfg())  # the schema default: 0.1; here 3 of 9
    message = str(err.value)
    # the two notes files count as one reason: their names are cut out of it
    assert message == (f"prepare.max_reject_fraction: 0.333 of the images were rejected (3 of 9), more than the "
                       f"allowed 0.1; most common reason (2 images): UnidentifiedImageError: cannot identify image "
                       f"file '<file>'; every reject is listed in {out / 'rejects.over_limit.parquet'}")
    # no shards, manifest, stats or samples: nothing a later stage reads; the list is not an output Snakemake removes
    assert listing(out) == {"rejects.over_limit.parquet"}
    assert len(pd.read_parquet(out / "rejects.over_limit.parquet")) == 3
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]
    # raising the limit lets the same data through
    stats = prepare_photos(tmp_path / "raw", tmp_path / "data_ok", photo_cfg(max_reject_fraction=0.4))
    assert stats["n_images"] == 6 and stats["n_rejected"] == 3


def test_reject_fraction_at_the_limit_passes_and_above_it_stops(tmp_path):
    root = photo_folder(tmp_path / "photos", n_good=5)  # 10 good images
    (root / "a" / "notes.jpg").write_text("not an image")
    read_image_folder(default_section("image_folder", path=str(root)), tmp_path / "raw")
    stats = prepare_photos(tmp_path / "raw", tmp_path / "at", photo_cfg(max_reject_fraction=1 / 11))
    assert stats["n_rejected"] == 1
    with pytest.raises(ValueError, match=r"^prepare\.max_reject_fraction: 0\.0909 of the images"):
        prepare_photos(tmp_path / "raw", tmp_path / "above", photo_cfg(max_reject_fraction=0.09))
    with pytest.raises(ValueError, match="max_reject_fraction"):
        prepare_photos(tmp_path / "raw", tmp_path / "zero", photo_cfg(max_reject_fraction=0))


@pytest.mark.parametrize("bad, expected", [(1.5, "expected <= 1, got 1.5"), (-0.1, "expected >= 0, got -0.1"),
                                           ("half", "expected number, got 'half'"),
                                           (None, "expected number, got None")])
def test_the_key_lives_in_the_schema_only(bad, expected):
    assert validate_config({})["prepare"]["max_reject_fraction"] == 0.1
    # the schema alone checks the value (the stages read it as validated): one line naming the key
    with pytest.raises(ConfigError) as err:
        validate_config({"prepare": {"max_reject_fraction": bad}})
    assert str(err.value) == f"config key 'prepare.max_reject_fraction': {expected}"


# --------------------------------------------------------------------------- DeepLense .npy class folders

def _sky(seed: int, shape=(8, 8)) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape)


def _object_pair(image, mass) -> np.ndarray:
    pair = np.empty(2, dtype=object)
    pair[0], pair[1] = image, mass
    return pair


def _bad_npy_files(folder: Path) -> dict[str, str]:
    """Write one bad file of each kind into ``folder``; name -> the start of its expected reject reason."""
    np.save(folder / "aaa_1x1.npy", np.ones((1, 1)))  # sorts first: must not set the shape for the good files
    good = io.BytesIO()
    np.save(good, _sky(1))
    (folder / "trunc.npy").write_bytes(good.getvalue()[:300])  # the header whole, half the pixels
    (folder / "empty.npy").write_bytes(b"")
    (folder / "text.npy").write_text("not an array")
    np.savez(folder / "archive.npz", a=_sky(2))
    (folder / "archive.npz").rename(folder / "archive.npy")
    nan, inf = _sky(3), _sky(4)
    nan[2, 2], inf[3, 3] = np.nan, -np.inf
    np.save(folder / "nan.npy", nan)
    np.save(folder / "inf.npy", inf)
    np.save(folder / "huge_values.npy", np.full((8, 8), 1e39))
    np.save(folder / "rgb.npy", np.ones((3, 8, 8)))
    np.save(folder / "flat.npy", np.ones(64))
    np.save(folder / "scalar.npy", np.float64(1.0))
    np.save(folder / "bigger.npy", _sky(5, (16, 16)))
    np.save(folder / "text_dtype.npy", np.full((8, 8), "x"))
    np.save(folder / "complex.npy", _sky(6) + 1j)
    np.save(folder / "pickled.npy", _object_pair(_sky(7), 1e-23), allow_pickle=True)
    with open(folder / "claims_huge.npy", "wb") as fh:  # a header declaring 80 GB, then 64 bytes
        np.lib.format.write_array_header_1_0(fh, {"descr": "<f8", "fortran_order": False, "shape": (100_000, 100_000)})
        fh.write(bytes(64))
    (folder / "notes.txt").write_text("not .npy: never read")
    return {
        "aaa_1x1.npy": "wrong shape (1, 1) (the most common shape among the .npy headers is (8, 8))",
        "trunc.npy": "unreadable: truncated (300 bytes; its header's (8, 8) float64 needs 640)",
        "empty.npy": "unreadable: EOFError: No data left in file",
        "text.npy": dl.PICKLE_REFUSED,
        "archive.npy": "unreadable: NpzFile, expected an .npy array",
        "nan.npy": "non-finite pixel values",
        "inf.npy": "non-finite pixel values",
        "huge_values.npy": "pixel values beyond the float32 range",
        "rgb.npy": "wrong shape (3, 8, 8) (expected (H, W) or (1, H, W))",
        "flat.npy": "wrong shape (64,) (expected (H, W) or (1, H, W))",
        "scalar.npy": "wrong shape () (expected (H, W) or (1, H, W))",
        "bigger.npy": "wrong shape (16, 16) (the most common shape among the .npy headers is (8, 8))",
        "text_dtype.npy": "not a numeric image (dtype <U1)",
        "complex.npy": "complex-valued image",
        "pickled.npy": dl.PICKLE_REFUSED,  # only the axion class may hold [image, m_axion] pickles
        "claims_huge.npy": "wrong shape (100000, 100000) (the most common shape among the .npy headers is (8, 8))",
    }


def deeplense_folder(root: Path, n_good: int = 8) -> Path:
    for k, label in enumerate(("no_sub", "cdm")):
        (root / label).mkdir(parents=True)
        for i in range(n_good):
            np.save(root / label / f"sim_{i}.npy", _sky(10 * k + i))
    return root


def test_each_bad_npy_is_recorded_with_its_reason_and_skipped(tmp_path):
    root = deeplense_folder(tmp_path / "deeplense", n_good=12)
    expected = _bad_npy_files(root / "cdm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning on the way to float32 either
        dl.read_folder(default_section("deeplense", path=str(root)), tmp_path / "raw", progress=False)
    assert listing(tmp_path / "raw") == {"images.npy", "truth.parquet", "rejects.parquet", "provenance.json"}
    rejects = pd.read_parquet(tmp_path / "raw" / "rejects.parquet")
    reasons = {Path(p).name: r for p, r in zip(rejects["path"], rejects["reason"])}
    assert set(reasons) == set(expected)
    for name, start in expected.items():
        assert reasons[name].startswith(start), (name, reasons[name])
    assert all("\n" not in r for r in reasons.values())
    images = np.load(tmp_path / "raw" / "images.npy")
    assert images.shape == (24, 1, 8, 8) and np.isfinite(images).all()

    stats = prepare(tmp_path / "raw", tmp_path / "data", lensing_cfg(max_reject_fraction=0.5), source="deeplense")
    data_rejects = pd.read_parquet(tmp_path / "data" / "rejects.parquet")
    assert stats["n_images"] == 24 and stats["n_rejected"] == len(expected) == len(data_rejects)
    assert set(data_rejects["stage"]) == {"fetch"} and (data_rejects["id"] == "").all()


def test_too_many_bad_npy_files_stop_prepare_before_any_work(tmp_path):
    root = deeplense_folder(tmp_path / "deeplense", n_good=4)
    for k in range(2):
        (root / "cdm" / f"junk{k}.npy").write_bytes(b"junk")
    dl.read_folder(default_section("deeplense", path=str(root)), tmp_path / "raw", progress=False)
    out = tmp_path / "results" / "data"
    with pytest.raises(ValueError) as err:
        prepare(tmp_path / "raw", out, lensing_cfg(), source="deeplense")
    message = str(err.value)
    assert message.startswith("prepare.max_reject_fraction: 0.2 of the images were rejected (2 of 10), more than the "
                              f"allowed 0.1; most common reason (2 images): {dl.PICKLE_REFUSED}")
    assert message.endswith(f"every reject is listed in {out / 'rejects.over_limit.parquet'}") and "\n" not in message
    assert listing(out) == {"rejects.over_limit.parquet"} and listing(out.parent) == {"data"}  # no temporary folder
    # within the limit, the run succeeds and the list of the failed attempt goes
    prepare(tmp_path / "raw", out, lensing_cfg(max_reject_fraction=0.5), source="deeplense")
    assert not (out / "rejects.over_limit.parquet").exists() and (out / "rejects.parquet").exists()


def test_the_cli_reports_too_many_rejects_in_one_line(tmp_path):
    raw = make_raw(tmp_path / "raw", n_per_class=2, size=16)
    images = np.load(raw / "images.npy")
    images[:2] = np.nan  # two of six images
    write_npy(raw / "images.npy", images)
    proc = subprocess.run([sys.executable, "-m", "ssl4sci.cli", "prepare", "--source", "simulate", "--raw", str(raw),
                           "--out", str(tmp_path / "data"), "--cfg", json.dumps(lensing_cfg())],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("ssl4sci prepare: error: prepare.max_reject_fraction: 0.333 of the images were "
                            "rejected (2 of 6), more than the allowed 0.1; most common reason (2 images): "
                            "non-finite pixel values")


def test_nan_inf_and_constant_images_in_the_raw_stack_are_prepare_rejects(tmp_path):
    raw = make_raw(tmp_path / "raw", n_per_class=6, size=16)
    images = np.load(raw / "images.npy")
    images[0, 0, 3, 3], images[1, 0, 0, 0], images[2] = np.nan, np.inf, 0.5
    write_npy(raw / "images.npy", images)
    stats = prepare(raw, tmp_path / "data", lensing_cfg(max_reject_fraction=0.5))
    rejects = pd.read_parquet(tmp_path / "data" / "rejects.parquet").set_index("id")
    assert rejects["reason"].to_dict() == {"sim-000000": "non-finite pixel values",
                                           "sim-000001": "non-finite pixel values",
                                           "sim-000002": "constant image (no signal)"}
    assert set(rejects["stage"]) == {"prepare"} and stats["n_images"] == 15


# --------------------------------------------------------------------------- fuzzing the decoders

MAGIC = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*",
         b"RIFF\x00\x00\x00\x00WEBPVP8 "]  # no prefix, or the start of each format Pillow opens here


def _decode_or_reason(path: Path) -> np.ndarray | str:
    """What the photo stage does with one file: the decoded array, or the one-line reject reason."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # as the stage does
        try:
            return decode_image(path, S, resample="bicubic")
        except Exception as exc:  # the stage turns every Exception into a reject; anything else would crash it
            return reject_reason(exc, str(path))


def _assert_decoded_or_rejected(outcome) -> None:
    if isinstance(outcome, str):
        assert outcome and "\n" not in outcome and len(outcome) <= REASON_CHARS
    else:
        assert outcome.shape == (3, S, S) and outcome.dtype == np.uint8


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _small_image_bytes(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


GOOD_FILES = {fmt: _small_image_bytes(fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")}


@FUZZ
@given(magic=st.sampled_from(MAGIC), body=st.binary(max_size=600))
def test_photo_decoder_on_random_bytes_decodes_or_gives_a_reason(scratch, magic, body):
    path = scratch / "random.img"
    path.write_bytes(magic + body)
    _assert_decoded_or_rejected(_decode_or_reason(path))


@FUZZ
@given(fmt=st.sampled_from(sorted(GOOD_FILES)), data=st.data())
def test_photo_decoder_on_damaged_real_files_decodes_or_gives_a_reason(scratch, fmt, data):
    blob = bytearray(GOOD_FILES[fmt])
    cut = data.draw(st.integers(0, len(blob)), label="truncate at")
    for _ in range(data.draw(st.integers(0, 8), label="flips")):
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    path = scratch / f"damaged.{fmt.lower()}"
    path.write_bytes(bytes(blob[:cut]))
    _assert_decoded_or_rejected(_decode_or_reason(path))


def _assert_loaded_or_rejected(path: Path, label: str | None) -> None:
    try:
        image, log10_m = dl._load(path, label)
    except dl._Reject as rej:
        assert str(rej) and "\n" not in str(rej)
        return
    assert image.ndim == 2 and np.isfinite(image).all() and np.isfinite(image.astype(np.float32)).all()
    assert label in ("axion", None) or np.isnan(log10_m)


NPY_MAGIC = [b"", b"\x93NUMPY\x01\x00", b"\x93NUMPY\x02\x00", b"\x93NUMPY\x03\x00", b"PK\x03\x04", b"\x80\x04"]


@FUZZ
@given(magic=st.sampled_from(NPY_MAGIC), body=st.binary(max_size=400), label=st.sampled_from(["cdm", "axion", None]))
def test_npy_loader_on_random_bytes_loads_or_rejects(scratch, magic, body, label):
    path = scratch / "random.npy"
    path.write_bytes(magic + body)
    _assert_loaded_or_rejected(path, label)


@FUZZ
@given(arr=hnp.arrays(dtype=st.one_of(hnp.scalar_dtypes(), hnp.byte_string_dtypes(), hnp.unicode_string_dtypes()),
                      shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)),
       label=st.sampled_from(["cdm", "axion", None]))
def test_npy_loader_on_any_dtype_and_shape_loads_or_rejects(scratch, arr, label):
    path = scratch / "array.npy"
    np.save(path, arr)
    _assert_loaded_or_rejected(path, label)


@settings(max_examples=4, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(blobs=st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=4))
def test_every_file_is_kept_or_rejected_never_lost(tmp_path_factory, blobs):
    root = photo_folder(tmp_path_factory.mktemp("photos"), n_good=4)
    for k, blob in enumerate(blobs):
        (root / "a" / f"random{k}.png").write_bytes(blob)
    out = tmp_path_factory.mktemp("run")
    read_image_folder(default_section("image_folder", path=str(root)), out / "raw")
    stats = prepare_photos(out / "raw", out / "data", photo_cfg(max_reject_fraction=1))
    ids = set(pd.read_parquet(out / "data" / "manifest.parquet")["id"])
    ids |= set(pd.read_parquet(out / "data" / "rejects.parquet")["id"])
    assert ids == {f"a/good{k}.jpg" for k in range(4)} | {f"b/good{k}.png" for k in range(4)} \
        | {f"a/random{k}.png" for k in range(len(blobs))}
    assert stats["n_images"] + stats["n_rejected"] == 8 + len(blobs)
