"""Photo prepare: robust decoding of every image mode, rejects, split, shards, train-only statistics."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import default_section
from PIL import Image

import ssl4sci.prepare_photos as pp
from ssl4sci.config import ConfigError, validate_config
from ssl4sci.data import PreparedData
from ssl4sci.io import write_parquet
from ssl4sci.prepare_photos import decode_image, prepare_photos, reject_reason, sample_classes

S = 16
CFG = default_section("prepare", image_size=S, resize_shorter=S, split={"train": 0.5, "val": 0.25, "test": 0.25},
                      shard_size=7, samples_per_class=2, workers=2,
                      max_reject_fraction=0.5)  # the fixtures hold broken files
OUTPUTS = {"manifest.parquet", "shards", "stats.json", "rejects.parquet", "samples.png"}


# ------------------------------------------------------------------------------------------- decoding

def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def test_rgb_is_resized_and_centre_cropped(tmp_path):
    # 60x30: red | blue | green thirds; the centre square is the blue middle 30 columns.
    arr = np.zeros((30, 60, 3), np.uint8)
    arr[:, :15] = (255, 0, 0)
    arr[:, 15:45] = (0, 0, 255)
    arr[:, 45:] = (0, 255, 0)
    out = decode_image(_save(Image.fromarray(arr), tmp_path / "a.png"), S, S, resample="bicubic")
    assert out.shape == (3, S, S) and out.dtype == np.uint8
    inner = out[:, :, 2:-2]
    assert (inner[2] == 255).all() and (inner[:2] == 0).all()
    # resize_shorter > image_size crops deeper into the image: still blue, and the default is 256/224 * S.
    assert (decode_image(tmp_path / "a.png", S, 2 * S, resample="bicubic")[2] == 255).all()
    assert pp.default_resize_shorter(224) == 256


@pytest.mark.parametrize("mode", ["L", "1"])
def test_grayscale_gives_three_equal_channels(tmp_path, mode):
    ramp = np.tile(np.linspace(0, 255, 40).astype(np.uint8), (40, 1))
    img = Image.fromarray(ramp, "L").convert(mode)
    out = decode_image(_save(img, tmp_path / f"g{mode}.png"), S, S, resample="bicubic")
    assert (out[0] == out[1]).all() and (out[1] == out[2]).all()
    assert out[0, :, 0].mean() < out[0, :, -1].mean() - 100  # the ramp survives


def test_alpha_is_composited_on_black(tmp_path):
    clear = decode_image(_save(Image.new("RGBA", (30, 20), (255, 200, 10, 0)), tmp_path / "clear.png"), S,
                         resample="bicubic")
    assert (clear == 0).all()
    half = decode_image(_save(Image.new("RGBA", (30, 20), (255, 0, 0, 128)), tmp_path / "half.png"), S,
                        resample="bicubic")
    assert np.abs(half[:, 8, 8].astype(int) - (128, 0, 0)).max() <= 1
    la = decode_image(_save(Image.new("LA", (30, 20), (200, 255)), tmp_path / "la.png"), S, resample="bicubic")
    assert (la == 200).all()
    la_clear = decode_image(_save(Image.new("LA", (30, 20), (200, 0)), tmp_path / "la0.png"), S, resample="bicubic")
    assert (la_clear == 0).all()


def test_palette_with_and_without_transparency(tmp_path):
    pal = Image.new("P", (30, 20), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.paste(2, (0, 0, 30, 10))  # top half: index 2 (black in the palette), bottom half: index 1 (green)
    solid = decode_image(_save(pal, tmp_path / "p.png"), S, resample="bicubic")
    assert (solid[:, -2, 8] == (0, 255, 0)).all()
    transparent = decode_image(_save(pal, tmp_path / "pt.png", transparency=1), S, resample="bicubic")
    assert (transparent[:, -2, 8] == 0).all()


def test_cmyk_cyan_becomes_rgb_cyan(tmp_path):
    cyan = Image.new("CMYK", (30, 20), (255, 0, 0, 0))
    for name, kw, tol in (("c.tif", {}, 0), ("c.jpg", {"quality": 95}, 3)):
        out = decode_image(_save(cyan, tmp_path / name, **kw), S, resample="bicubic")
        assert np.abs(out.reshape(3, -1).mean(axis=1) - (0, 255, 255)).max() <= tol, name


def test_high_bit_depth_is_scaled_by_its_maximum_not_clipped(tmp_path):
    a = np.zeros((64, 64), np.uint16)
    a[:32], a[32:] = 4095, 1000  # 12-bit data in a 16-bit container
    for name, img in (("i16.png", Image.fromarray(a)), ("i16b.tif", Image.fromarray(a.astype(">u2")))):
        assert img.mode in ("I;16", "I;16B")
        out = decode_image(_save(img, tmp_path / name), S, S, resample="bicubic")
        assert (out[:, 0] == 255).all(), name
        assert (out[:, -1] == round(1000 * 255 / 4095)).all(), name
        assert (out[0] == out[2]).all()
    # 32-bit integer with negative values and float: min-max.
    signed = decode_image(_save(Image.fromarray(a.astype(np.int32) - 2000), tmp_path / "i.tif"), S, S,
                          resample="bicubic")
    assert (signed[:, 0] == 255).all() and (signed[:, -1] == 0).all()
    flt = decode_image(_save(Image.fromarray(a.astype(np.float32) / 7 - 3), tmp_path / "f.tif"), S, S,
                       resample="bicubic")
    assert (flt[:, 0] == 255).all() and (flt[:, -1] == 0).all()
    flat = decode_image(_save(Image.fromarray(np.full((20, 20), 3.5, np.float32)), tmp_path / "flat.tif"), S, S,
                        resample="bicubic")
    assert (flat == 0).all()


def test_exif_orientation_is_applied(tmp_path):
    # Stored 40 wide x 20 high: left half red, right half blue. Orientation 6 = rotate 90 degrees
    # clockwise to display: 20 wide x 40 high with the red half on top.
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_image(_save(Image.fromarray(arr), tmp_path / "rot.jpg", exif=exif, quality=95), S, S,
                       resample="bicubic")
    top, bottom = out[:, 1].mean(axis=1), out[:, -2].mean(axis=1)
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom
    plain = decode_image(_save(Image.fromarray(arr), tmp_path / "plain.jpg", quality=95), S, S, resample="bicubic")
    assert plain[0, :, 1].mean() > 200 and plain[2, :, -2].mean() > 200  # unrotated: red on the left


def test_animated_gif_uses_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (30, 20), c) for c in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(path).n_frames == 2
    out = decode_image(path, S, resample="bicubic")
    assert (out[:, 8, 8] == (255, 0, 0)).all()


def test_large_jpeg_reduced_decode_matches_full_decode(tmp_path):
    yy, xx = np.mgrid[:1600, :2000]
    arr = np.stack([xx * 255 // 1999, yy * 255 // 1599, (xx + yy) * 255 // 3598], axis=-1).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "big.jpg", quality=95)
    Image.fromarray(arr).save(tmp_path / "big.png")
    fast, exact = (decode_image(tmp_path / "big.jpg", 32, resample="bicubic"),
                   decode_image(tmp_path / "big.png", 32, resample="bicubic"))
    assert np.abs(fast.astype(int) - exact.astype(int)).max() <= 6


def _truncated_jpeg(path: Path) -> Path:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def test_unreadable_files_raise_with_a_short_reason(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("not an image\n" * 5)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    cases = ["empty.jpg", "notes.jpg", "corrupt.png", _truncated_jpeg(tmp_path / "trunc.jpg").name, "missing.jpg"]
    for name in cases:
        with pytest.raises(Exception) as info:
            decode_image(tmp_path / name, S, resample="bicubic")
        reason = reject_reason(info.value, str(tmp_path / name))
        assert "\n" not in reason and len(reason) <= pp.REASON_CHARS and ":" in reason, reason
        assert str(tmp_path) not in reason


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_limit_rejects(tmp_path, monkeypatch):
    _save(Image.new("RGB", (40, 30)), tmp_path / "warn.png")  # 1200 px: over the limit, under twice it
    _save(Image.new("RGB", (100, 100)), tmp_path / "error.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(pp.PhotoError, match="MAX_IMAGE_PIXELS"):
        decode_image(tmp_path / "warn.png", S, resample="bicubic")
    with pytest.raises(Image.DecompressionBombError):
        decode_image(tmp_path / "error.png", S, resample="bicubic")


# ------------------------------------------------------------------------------------------- the stage

def _colour_image(path: Path, colour, size=(24, 18)) -> Path:
    return _save(Image.new("RGB", size, tuple(int(c) for c in colour)), path)


def make_photo_raw(root: Path, n_per_class=(10, 9, 8), tiny=(1, 2), bad=True, seed=0) -> Path:
    """Uniform-colour images (a random colour each, so splits differ in brightness), a few broken files."""
    rng = np.random.default_rng(seed)
    img_dir, raw = root / "images", root / "raw"
    img_dir.mkdir(parents=True)
    rows = []
    labels = [f"class_{c}" for c in "cab"[: len(n_per_class)]]  # not in sorted order on purpose
    for label, n in list(zip(labels, n_per_class)) + [(f"tiny_{k}", n) for k, n in enumerate(tiny)]:
        for _ in range(n):
            i = len(rows)
            fmt = ("png", "jpg", "png")[i % 3]
            path = _colour_image(img_dir / f"{i:04d}.{fmt}", rng.integers(0, 256, 3)) if fmt == "png" else \
                _save(Image.new("L", (18, 24), int(rng.integers(0, 256))), img_dir / f"{i:04d}.{fmt}", quality=95)
            rows.append({"id": f"img-{i:04d}", "path": str(path), "label": label, "genus": label.upper(),
                         "photographer": f"p{i % 4}"})
    if bad:
        (img_dir / "empty.jpg").write_bytes(b"")
        (img_dir / "notes.png").write_text("hello")
        _truncated_jpeg(img_dir / "trunc.jpg")
        for name in ("empty.jpg", "notes.png", "trunc.jpg", "missing.jpg"):
            rows.append({"id": f"bad-{name}", "path": str(img_dir / name), "label": labels[0], "genus": "X",
                         "photographer": "p"})
    raw.mkdir()
    write_parquet(raw / "metadata.parquet", pd.DataFrame(rows))
    write_parquet(raw / "rejects.parquet", pd.DataFrame({"id": ["f1", "f2"], "path": ["http://x/1", "http://x/2"],
                                                        "reason": ["HTTP 404", "timeout"]}))
    return raw


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    raw = make_photo_raw(root)
    stats = prepare_photos(raw, root / "data", dict(CFG))
    return root, raw, stats


def test_outputs_manifest_and_rejects(run):
    root, raw, stats = run
    out = root / "data"
    assert set(os.listdir(out)) == OUTPUTS  # and no temporary files left behind
    assert not [p for p in os.listdir(root) if p.startswith(".")]
    m = pd.read_parquet(out / "manifest.parquet")
    meta = pd.read_parquet(raw / "metadata.parquet")
    assert {"id", "path", "label", "genus", "photographer", "split", "label_id", "shard", "index"} <= set(m.columns)
    assert len(m) == len(meta) - 4 == stats["n_images"] and m["id"].is_unique
    classes = ["class_a", "class_b", "class_c", "tiny_0", "tiny_1"]
    assert stats["classes"] == classes
    assert (m["label_id"] == m["label"].map(classes.index)).all()
    rej = pd.read_parquet(out / "rejects.parquet")
    assert list(rej.columns) == ["id", "path", "reason", "stage"] and stats["n_rejected"] == len(rej) == 6
    assert rej.set_index("id").loc[["f1", "f2"], "stage"].tolist() == ["fetch", "fetch"]
    mine = rej[rej["stage"] == "prepare"].set_index("id")["reason"]
    assert set(mine.index) == {f"bad-{n}" for n in ("empty.jpg", "notes.png", "trunc.jpg", "missing.jpg")}
    assert mine["bad-missing.jpg"].startswith("FileNotFoundError")
    assert mine["bad-empty.jpg"].startswith("UnidentifiedImageError")
    assert "truncated" in mine["bad-trunc.jpg"]
    assert (out / "samples.png").stat().st_size > 1000


def test_split_counts_and_tiny_classes_go_to_train(run):
    root, _, stats = run
    m = pd.read_parquet(root / "data" / "manifest.parquet")
    assert (m.loc[m["label"].str.startswith("tiny"), "split"] == "train").all()
    assert stats["small_classes_in_train"] == ["tiny_0", "tiny_1"]
    for split in ("train", "val", "test"):
        counts = m[m["split"] == split]["label"].value_counts().reindex(stats["classes"], fill_value=0)
        assert stats["counts"][split] == counts.to_dict()
    assert all(stats["counts"][s]["class_a"] > 0 for s in ("train", "val", "test"))


def test_min_count_keeps_tiny_classes_whole_in_train(tmp_path):
    raw = make_photo_raw(tmp_path, n_per_class=(6,), tiny=(2,), bad=False)
    cfg = {**CFG, "split": {"train": 0.4, "val": 0.3, "test": 0.3}}  # a 2-image class would give one to test
    prepare_photos(raw, tmp_path / "a", {**cfg, "min_count": 0})
    split = pd.read_parquet(tmp_path / "a" / "manifest.parquet").set_index("id")["split"]
    stats = prepare_photos(raw, tmp_path / "b", {**cfg, "min_count": 3})
    kept = pd.read_parquet(tmp_path / "b" / "manifest.parquet").set_index("id")["split"]
    tiny = [i for i in kept.index if i >= "img-0006"]
    assert set(split[tiny]) != {"train"} and set(kept[tiny]) == {"train"}
    assert stats["small_classes_in_train"] == ["tiny_0"] and stats["counts"]["test"]["tiny_0"] == 0
    others = [i for i in kept.index if i not in tiny]
    assert (split[others] == kept[others]).all()  # the other classes' split does not move


def test_shards_are_fixed_size_and_hold_the_right_images(run):
    root, raw, stats = run
    data = PreparedData(root / "data")
    m = data.manifest
    sizes = [np.load(root / "data" / "shards" / f"shard-{k:05d}.npy", mmap_mode="r").shape
             for k in range(stats["n_shards"])]
    n = len(m)
    assert stats["n_shards"] == -(-n // 7) and len(os.listdir(root / "data" / "shards")) == stats["n_shards"]
    assert all(s == (7, 3, S, S) for s in sizes[:-1]) and sizes[-1] == (n - 7 * (len(sizes) - 1), 3, S, S)
    assert not m.duplicated(["shard", "index"]).any()
    for _, row in m.sample(8, random_state=0).iterrows():
        stored = np.asarray(data._shard(int(row["shard"]))[int(row["index"])])
        assert stored.dtype == np.uint8
        assert (stored == decode_image(row["path"], S, S, resample="bicubic")).all()
    img = data.raw_image(int(m["shard"].iloc[0]), int(m["index"].iloc[0]))
    assert img.shape == (3, S, S) and 0 <= float(img.min()) and float(img.max()) <= 1
    assert data.channels == 3 and data.image_size == S and data.uint8 and stats["has_masks"] is False


def test_stats_are_from_the_train_split_only(run):
    root, _, stats = run
    data = PreparedData(root / "data")
    m = data.manifest

    def pixels(rows):
        return np.stack([np.asarray(data._shard(int(r.shard))[int(r.index)], dtype=np.float64) / 255
                         for r in rows.itertuples()])

    train, rest = pixels(m[m["split"] == "train"]), pixels(m[m["split"] != "train"])
    np.testing.assert_allclose(stats["mean"], train.mean(axis=(0, 2, 3)), atol=1e-9)
    np.testing.assert_allclose(stats["std"], train.std(axis=(0, 2, 3)), atol=1e-9)
    # The case really distinguishes train-only from all-image statistics.
    everything = np.concatenate([train, rest]).mean(axis=(0, 2, 3))
    assert np.abs(everything - train.mean(axis=(0, 2, 3))).max() > 0.01
    normalised = np.stack([data.normalise(data.raw_image(int(r.shard), int(r.index))).numpy()
                           for r in m[m["split"] == "train"].itertuples()])
    np.testing.assert_allclose(normalised.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(normalised.std(axis=(0, 2, 3)), 1, atol=1e-4)
    assert stats["dtype"] == "uint8" and stats["channels"] == 3 and stats["resize"]["shorter"] == S


def test_deterministic_with_seed_and_thread_count(run, tmp_path):
    root, raw, _ = run
    first = pd.read_parquet(root / "data" / "manifest.parquet")
    prepare_photos(raw, tmp_path / "again", {**CFG, "workers": 1})
    again = pd.read_parquet(tmp_path / "again" / "manifest.parquet")
    pd.testing.assert_frame_equal(first, again)
    for k in range(len(os.listdir(tmp_path / "again" / "shards"))):
        name = f"shard-{k:05d}.npy"
        assert (np.load(root / "data" / "shards" / name) == np.load(tmp_path / "again" / "shards" / name)).all()
    prepare_photos(raw, tmp_path / "other", {**CFG, "seed": 1})
    other = pd.read_parquet(tmp_path / "other" / "manifest.parquet")
    assert not (other["split"] == first["split"]).all()


def test_rerun_replaces_outputs_and_failure_leaves_nothing(tmp_path, monkeypatch):
    raw = make_photo_raw(tmp_path, n_per_class=(4, 4), tiny=(), bad=False)
    out = tmp_path / "data"
    prepare_photos(raw, out, {**CFG, "shard_size": 3})
    prepare_photos(raw, out, {**CFG, "shard_size": 5})  # fewer shards now: no stale ones remain
    assert sorted(os.listdir(out / "shards")) == ["shard-00000.npy", "shard-00001.npy"]

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pp, "write_samples_png", boom)
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_photos(raw, fresh, dict(CFG))
    assert os.listdir(fresh) == []  # no shards, no temporary folder, no manifest


def test_all_rejected_is_an_error_and_bomb_limit_rejects(tmp_path, monkeypatch):
    img_dir, raw = tmp_path / "img", tmp_path / "raw"
    img_dir.mkdir()
    (img_dir / "x.jpg").write_bytes(b"")
    write_parquet(raw / "metadata.parquet",
                  pd.DataFrame({"id": ["x"], "path": [str(img_dir / "x.jpg")], "label": ["a"]}))
    with pytest.raises(ValueError, match="every image was rejected"):
        prepare_photos(raw, tmp_path / "data", dict(CFG))
    assert os.listdir(tmp_path / "data") == []

    _save(Image.new("RGB", (40, 30), (9, 9, 9)), img_dir / "big.png")
    _save(Image.new("RGB", (20, 20), (9, 9, 9)), img_dir / "ok.png")
    write_parquet(raw / "metadata.parquet", pd.DataFrame({"id": ["big", "ok"], "label": ["a", "a"],
                                                          "path": [str(img_dir / "big.png"), str(img_dir / "ok.png")]}))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    stats = prepare_photos(raw, tmp_path / "data", {**CFG, "min_count": 0})
    rej = pd.read_parquet(tmp_path / "data" / "rejects.parquet")
    assert rej["id"].tolist() == ["big"] and rej["stage"].tolist() == ["prepare"]
    assert "MAX_IMAGE_PIXELS" in rej["reason"].iloc[0] or "DecompressionBomb" in rej["reason"].iloc[0]
    assert stats["n_images"] == 1 and stats["n_rejected"] == 1


def test_sample_grid_shows_at_most_eight_classes():
    many = [f"c{k:02d}" for k in range(30)]
    shown = sample_classes(many)
    assert len(shown) == 8 and shown[0] == "c00" and shown[-1] == "c29" and shown == sorted(shown)
    assert sample_classes(many[:5]) == many[:5]


def test_bad_config_is_refused():
    # resize_shorter is checked once, by the config, in one line naming the key
    with pytest.raises(ConfigError, match=rf"^config key 'prepare\.resize_shorter': expected >= prepare\.image_size "
                                          rf"\({S}\), got {S - 1}$"):
        validate_config({"source": "image_folder", "prepare": {"image_size": S, "resize_shorter": S - 1}})
    # the split's fractions are checked once, by the config, in one line naming the key
    with pytest.raises(ConfigError, match=r"^config key 'prepare\.split': fractions must sum to 1, got 1\.2$"):
        validate_config({"prepare": {"split": {"train": 0.9, "val": 0.2, "test": 0.1}}})
