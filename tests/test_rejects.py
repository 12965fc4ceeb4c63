"""One table of the fetch's and the prepare stage's rejects, and the limit on their share."""
from __future__ import annotations

import pandas as pd
import pytest

from ssl4sci.rejects import REJECT_COLUMNS, check_reject_fraction, merge_rejects


def test_merge_rejects_marks_the_source_rejects_fetch_and_keeps_their_order():
    fetched = pd.DataFrame({"path": ["http://x/1", "http://x/2"], "reason": ["HTTP 404", "timeout"],
                            "stage": ["fetch", None]})
    merged = merge_rejects(fetched, [{"id": "a", "path": "a.jpg", "reason": "bad", "stage": "prepare"}])
    assert tuple(merged.columns) == REJECT_COLUMNS
    assert merged.values.tolist() == [["", "http://x/1", "HTTP 404", "fetch"], ["", "http://x/2", "timeout", "fetch"],
                                      ["a", "a.jpg", "bad", "prepare"]]
    empty = merge_rejects(pd.DataFrame(), [])
    assert tuple(empty.columns) == REJECT_COLUMNS and len(empty) == 0


def test_reject_fraction_at_the_limit_passes_and_above_it_stops_in_one_line(tmp_path):
    reason = "UnidentifiedImageError: cannot identify image file '{}'"
    rejects = merge_rejects(pd.DataFrame(), [{"id": f"r{k}", "path": f"/d/n{k}.jpg", "stage": "prepare",
                                              "reason": reason.format(f"n{k}.jpg")} for k in range(2)])
    out = tmp_path / "rejects.parquet"
    check_reject_fraction(rejects, 8, 0.2, out)  # 2 of 10
    assert not (tmp_path / "rejects.over_limit.parquet").exists()
    with pytest.raises(ValueError) as err:
        check_reject_fraction(rejects, 8, 0.1, out)
    listed = tmp_path / "rejects.over_limit.parquet"
    assert str(err.value) == ("prepare.max_reject_fraction: 0.2 of the images were rejected (2 of 10), more than the "
                              "allowed 0.1; most common reason (2 images): UnidentifiedImageError: cannot identify "
                              f"image file '<file>'; every reject is listed in {listed}")
    assert len(pd.read_parquet(tmp_path / "rejects.over_limit.parquet")) == 2
    check_reject_fraction(rejects, 8, 0.5, out)  # a later run within the limit removes the list
    assert not (tmp_path / "rejects.over_limit.parquet").exists()
