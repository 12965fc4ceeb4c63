import json

import numpy as np
import pandas as pd
import pytest
from conftest import PREPARE_CFG, make_raw

from ssl4sci.data import PreparedData
from ssl4sci.io import write_npy
from ssl4sci.prepare import bounding_box, dataset_box, prepare, robust_signal_mask, square_box


def test_signal_mask_finds_a_bright_blob_on_a_noisy_dark_sky():
    rng = np.random.default_rng(0)
    img = 0.05 * rng.normal(size=(1, 1, 50, 50)).astype(np.float32)
    img[0, 0, 20:26, 30:38] += 1.0
    mask = robust_signal_mask(img, 3.0)[0]
    y0, y1, x0, x1 = bounding_box(mask)
    # Smoothing may grow the blob by a pixel, never leave it, and noise spikes do not stretch the box.
    assert 19 <= y0 <= 20 and 26 <= y1 <= 27 and 29 <= x0 <= 30 and 38 <= x1 <= 39


def test_square_box_is_square_inside_the_image_and_holds_the_signal():
    box = square_box((10, 20, 40, 46), margin=0.2, height=50, width=50)
    y0, y1, x0, x1 = box
    assert y1 - y0 == x1 - x0
    assert 0 <= y0 <= 10 and y1 >= 20 and x0 <= 40 and 46 <= x1 <= 50
    assert square_box(None, 0.1, 30, 40) == (0, 30, 0, 40)


def test_dataset_box_ignores_rare_outliers():
    masks = []
    for _ in range(200):
        m = np.zeros((60, 60), bool)
        m[25:35, 25:35] = True
        masks.append(m)
    outlier = np.zeros((60, 60), bool)
    outlier[0, 0] = outlier[59, 59] = True
    box = dataset_box(masks + [outlier], margin=0.0, height=60, width=60)
    assert box == (25, 35, 25, 35)


def test_prepare_writes_every_output_consistently(prepared):
    data = PreparedData(prepared)
    m = data.manifest
    assert {"id", "split", "label", "label_id", "shard", "index", "log10_m_axion", "source"} <= set(m.columns)
    assert len(m) == 36 and m["id"].is_unique
    assert data.classes == ["no_sub", "cdm", "axion"]
    assert data.stats["counts"]["test"] == {"no_sub": 3, "cdm": 3, "axion": 3}
    # fixed-size shards: every shard but the last is full, and (shard, index) addresses each image once
    shards = sorted((prepared / "shards").glob("shard-*.npy"))
    sizes = [np.load(p, mmap_mode="r").shape for p in shards]
    assert all(s[0] == PREPARE_CFG["shard_size"] for s in sizes[:-1])
    assert all(s[1:] == (1, 32, 32) for s in sizes)
    assert len(set(zip(m["shard"], m["index"]))) == len(m)
    assert np.load(shards[0], mmap_mode="r").dtype == np.float16
    # statistics come from the train split: normalised train pixels have mean 0, std 1
    train = np.stack([data.normalise(data.raw_image(s, i)).numpy()
                      for s, i in zip(*data.rows(["train"])[["shard", "index"]].to_numpy().T)])
    assert abs(train.mean()) < 1e-2 and abs(train.std() - 1) < 1e-2
    assert (prepared / "samples.png").stat().st_size > 1000
    assert data.mask(0, 0) is not None and data.mask(0, 0).shape == (32, 32)
    assert not list(prepared.parent.glob(".prepare-*")) and not list(prepared.glob(".*tmp*"))


def test_bad_images_are_recorded_and_skipped(tmp_path):
    raw = make_raw(tmp_path / "raw", n_per_class=6)
    images = np.load(raw / "images.npy")
    images[2] = np.nan
    images[7] = 0.5
    write_npy(raw / "images.npy", images)
    prepare(raw, tmp_path / "data", dict(PREPARE_CFG))
    rejects = pd.read_parquet(tmp_path / "data" / "rejects.parquet")
    assert sorted(rejects["id"]) == ["sim-000002", "sim-000007"]
    assert set(rejects["reason"]) == {"non-finite pixel values", "constant image (no signal)"}
    manifest = pd.read_parquet(tmp_path / "data" / "manifest.parquet")
    assert len(manifest) == 16 and "sim-000002" not in set(manifest["id"])
    assert json.loads((tmp_path / "data" / "stats.json").read_text())["n_rejected"] == 2


def test_any_channel_count_and_per_image_crop(tmp_path):
    raw = make_raw(tmp_path / "raw", n_per_class=4, channels=3)
    cfg = dict(PREPARE_CFG, crop="per_image", dtype="uint8", split={"train": 0.5, "val": 0.0, "test": 0.5})
    stats = prepare(raw, tmp_path / "data", cfg)
    assert stats["channels"] == 3 and len(stats["mean"]) == 3
    data = PreparedData(tmp_path / "data")
    assert data.raw_image(0, 0).shape == (3, 32, 32)
    assert 0.0 <= float(data.raw_image(0, 0).min()) and float(data.raw_image(0, 0).max()) <= 1.0


def test_missing_raw_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="images.npy"):
        prepare(tmp_path, tmp_path / "data", dict(PREPARE_CFG))
