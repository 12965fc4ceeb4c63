"""The raw photo layout every photo source writes (ssl4sci.sources.raw_layout)."""
from __future__ import annotations

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest

from ssl4sci.sources.raw_layout import BASE_COLUMNS, UNLABELLED, SourceError, check_image_file, clean, reject, write_raw


def test_clean_keeps_text_and_drops_what_is_missing():
    assert clean("  Corvus   corax ") == "Corvus corax"
    assert clean(" a  b.jpg ", collapse=False) == "a  b.jpg"
    assert [clean(v) for v in (None, float("nan"), "", "  ", "NaN", "none", "null")] == [None] * 7
    assert clean(7) == "7"


def test_check_image_file_names_the_reason(tmp_path):
    (tmp_path / "ok.jpg").write_bytes(b"x")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "folder.jpg").mkdir()
    assert check_image_file(tmp_path / "ok.jpg") is None
    assert check_image_file(tmp_path / "empty.jpg") == "empty image file"
    assert check_image_file(tmp_path / "folder.jpg") == "image path is not a file"
    assert check_image_file(tmp_path / "missing.jpg") == "image file not found"


def test_write_raw_writes_the_layout_with_the_pool_column(tmp_path):
    rows = [{"id": "a", "path": "/x/a.jpg", "label": "cat", "source": "test", "extra": 1},
            {"id": "unlabelled/b", "path": "/x/b.jpg", "label": None, "source": "test", UNLABELLED: True}]
    rejects: list[dict] = []
    reject(rejects, "c", None, "no label")
    prov = write_raw(tmp_path, rows, rejects, {"source": "test", "counts": {"labels": 1}}, extra_columns=("extra",))
    meta = pd.read_parquet(tmp_path / "metadata.parquet")
    assert list(meta.columns) == [*BASE_COLUMNS, "extra", UNLABELLED]
    assert meta["extra"][0] == "1" and meta["extra"].isna().tolist() == [False, True]  # strings, null kept
    assert list(meta[UNLABELLED]) == [False, True]
    saved = pq.read_table(tmp_path / "rejects.parquet")
    assert saved.to_pylist() == [{"id": "c", "path": None, "reason": "no label", "stage": "fetch"}]
    assert prov["counts"] == {"kept": 2, "dropped": 1, "dropped_by_reason": {"no label": 1}, "unlabelled": 1,
                              "labels": 1}
    assert json.loads((tmp_path / "provenance.json").read_text()) == json.loads(json.dumps(prov))


def test_write_raw_writes_nothing_without_rows_or_with_repeated_ids(tmp_path):
    rejects: list[dict] = []
    reject(rejects, "a", "/x/a.jpg", "empty image file")
    with pytest.raises(SourceError, match=r"^test: no image kept \(1 empty image file\); check the settings"):
        write_raw(tmp_path, [], rejects, {}, what="test")
    row = {"id": "a", "path": "/x/a.jpg", "label": "cat", "source": "test"}
    with pytest.raises(SourceError, match=r"^test: id 'a' occurs twice; ids must be unique"):
        write_raw(tmp_path, [row, dict(row)], [], {}, what="test")
    assert list(tmp_path.iterdir()) == []
