"""The seeded stratified split, the unlabelled pool beside it, and the split's warnings."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ssl4sci.splits import cut_pool_labels, pool_mask, split_warnings, split_with_pool, stratified_split


def test_split_is_stratified_seeded_and_complete():
    labels = pd.Series(["a"] * 50 + ["b"] * 30)
    fr = {"train": 0.6, "val": 0.2, "test": 0.2}
    s1, s2 = stratified_split(labels, fr, 1), stratified_split(labels, fr, 1)
    assert (s1 == s2).all()
    assert not (s1 == stratified_split(labels, fr, 2)).all()
    counts = pd.crosstab(labels, s1)
    assert counts.loc["a", "test"] == 10 and counts.loc["b", "test"] == 6
    assert counts.loc["a", "train"] == 30 and counts.loc["b", "val"] == 6


def test_a_class_of_one_keeps_its_image_in_train():
    split = stratified_split(pd.Series(["a"] * 10 + ["lone"]), {"train": 0.5, "val": 0.25, "test": 0.25}, 0)
    assert split[-1] == "train"


def test_pool_rows_get_the_unlabelled_split_and_the_labelled_split_does_not_move():
    labels = pd.Series(["a", "b"] * 10)
    fr = {"train": 0.5, "val": 0.25, "test": 0.25}
    pool = np.zeros(20, dtype=bool)
    pool[[3, 8, 15]] = True
    split = split_with_pool(labels, pool, fr, 0)
    assert (split[pool] == "unlabelled").all()
    assert (split[~pool] == stratified_split(labels[~pool].reset_index(drop=True), fr, 0)).all()


def test_pool_mask_reads_the_pool_column():
    assert pool_mask(pd.DataFrame({"id": ["x", "y", "z"], "unlabelled": [True, None, False]})).tolist() == [
        True, False, False]
    assert pool_mask(pd.DataFrame({"id": ["x"]})).tolist() == [False]


def test_cut_pool_labels_keeps_provenance_and_cuts_truth():
    manifest = pd.DataFrame({"id": ["l", "p"], "label": ["cdm", "x"], "label_id": [0, 0], "species": ["s", "t"],
                             "log10_m_axion": [-23.0, -22.0], "seed": [1, 2], "unlabelled": [False, True]})
    cut = cut_pool_labels(manifest, np.array([False, True]))
    assert "unlabelled" not in cut.columns
    assert cut.loc[1, ["label", "label_id", "seed", "id"]].tolist() == ["", -1, 2, "p"]
    assert cut.loc[1, "species"] is None and np.isnan(cut.loc[1, "log10_m_axion"])
    assert cut.loc[0, ["label", "species", "log10_m_axion"]].tolist() == ["cdm", "s", -23.0]


def test_split_warnings_name_at_most_five_classes(capsys):
    classes = [f"c{k}" for k in range(7)]
    counts = {"train": dict.fromkeys(classes, 3), "val": dict.fromkeys(classes, 0), "test": dict.fromkeys(classes, 1)}
    found = split_warnings(counts, {"train": 0.6, "val": 0.2, "test": 0.2}, classes)
    assert found == ["7 class(es) have no val images, too few to split: 'c0', 'c1', 'c2', 'c3', 'c4', ..."]
    assert capsys.readouterr().err == f"prepare: warning: {found[0]}\n"
    assert split_warnings({"train": {"a": 2}, "val": {"a": 0}, "test": {"a": 0}},
                          {"train": 1.0, "val": 0.0, "test": 0.0}, ["a"]) == [
        "one class only ('a'): the label-based evaluations need at least 2"]
