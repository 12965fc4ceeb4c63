"""Local photo folders (ssl4sci.sources.image_folder): class folders, a CSV of paths and labels, bad settings."""
from __future__ import annotations

import pandas as pd
import pytest
from conftest import _read, default_section, write_photo

from ssl4sci.config import ConfigError, validate_config
from ssl4sci.sources.archive import SourceError
from ssl4sci.sources.image_folder import read_image_folder
from ssl4sci.sources.raw_layout import BASE_COLUMNS

RANKS = ["kingdom", "phylum", "class", "order", "family", "genus", "species"]


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
