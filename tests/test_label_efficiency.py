"""Label-efficiency stage: nested stratified subsets, and the study run for real on a tiny prepared set."""
import json
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from conftest import CLASSIFY_KEYS, FRACTIONS, default_section

from ssl4sci.label_efficiency import draw_subsets, labelled_rows, linear_study, nested_subsets

KINDS = ("linear", "finetune", "regress")


def _ids(subsets, task, seed, fraction):
    part = subsets[(subsets["task"] == task) & (subsets["seed"] == seed) & (subsets["fraction"] == fraction)]
    return set(part["id"])


def test_subsets_are_stratified_nested_seeded_and_only_labelled_train_rows(pool_data):
    manifest = pd.read_parquet(pool_data / "manifest.parquet")
    rows = labelled_rows(manifest)
    assert "unlabelled" not in set(rows["split"]) and (rows["label_id"] >= 0).all()
    cfg = default_section("label_efficiency")
    subsets = draw_subsets(rows, cfg, "log10_m_axion", "axion", pool_data / "manifest.parquet")
    train = manifest[manifest["split"] == "train"]
    label_of = dict(zip(manifest["id"], manifest["label"]))
    axion_train = set(train.loc[train["label"] == "axion", "id"])
    assert set(subsets["seed"]) == {0, 1, 2} and set(subsets["fraction"]) == {1.0, 10.0, 100.0}
    assert set(subsets["id"]) <= set(train["id"])  # never val, test or the unlabelled pool
    for seed in (0, 1, 2):
        small, mid, full = (_ids(subsets, "classify", seed, float(f)) for f in FRACTIONS)
        assert small <= mid <= full == set(train["id"])  # nested, and 100 % is the whole train split
        for ids in (small, mid, full):  # stratified: every class at every fraction
            assert {label_of[i] for i in ids} == set(train["label"])
        r_small, r_mid, r_full = (_ids(subsets, "regress", seed, float(f)) for f in FRACTIONS)
        assert 2 <= len(r_small) and r_small <= r_mid <= r_full == axion_train
    # seeded: drawn again, or from shuffled rows, the same ids
    again = draw_subsets(rows.sample(frac=1.0, random_state=5), cfg, "log10_m_axion", "axion", pool_data)
    pd.testing.assert_frame_equal(again.sort_values(list(again.columns)).reset_index(drop=True),
                                  subsets.sort_values(list(subsets.columns)).reset_index(drop=True))


def test_per_class_counts_and_different_seeds_differ():
    ids = np.array([f"img{i:04d}" for i in range(330)])
    groups = np.repeat(["a", "b", "c"], [200, 100, 30])
    table = nested_subsets(ids, groups, [1, 10, 100], [0, 1], min_per_group=1)
    label = dict(zip(ids, groups))
    for seed in (0, 1):
        counts = pd.Series([label[i] for i in table.loc[(table["seed"] == seed) & (table["fraction"] == 10.0), "id"]])
        assert counts.value_counts().to_dict() == {"a": 20, "b": 10, "c": 3}  # round(0.1 n) per class
        counts = pd.Series([label[i] for i in table.loc[(table["seed"] == seed) & (table["fraction"] == 1.0), "id"]])
        assert counts.value_counts().to_dict() == {"a": 2, "b": 1, "c": 1}  # at least one of every class
    seed0 = set(table.loc[(table["seed"] == 0) & (table["fraction"] == 10.0), "id"])
    seed1 = set(table.loc[(table["seed"] == 1) & (table["fraction"] == 10.0), "id"])
    assert seed0 != seed1


def test_stage_writes_finite_metrics_with_the_issue_keys(study, pool_data):
    out, result = study
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["method"] == "random_init" and saved["seeds"] == [0, 1, 2]
    assert list(saved["protocols"]) == [f"{k}@{f}" for k in KINDS for f in FRACTIONS]
    for name, entry in saved["protocols"].items():
        keys = CLASSIFY_KEYS if not name.startswith("regress") else {"mae", "mae_std"}
        assert keys <= set(entry["metrics"]) and all(math.isfinite(v) for v in entry["metrics"].values())
        assert len(entry["runs"]) == 3 and entry["n_train"] >= 1
    assert saved["protocols"]["regress@100"]["metrics"]["mae_predict_train_mean"] > 0
    n_train = (pd.read_parquet(pool_data / "manifest.parquet")["split"] == "train").sum()  # 6 a class
    assert [saved["protocols"][f"finetune@{f}"]["n_train"] for f in FRACTIONS] == [3, 3, n_train]
    assert set(saved["time_s"]) == set(KINDS)
    # the ids every fit trained on: labelled train rows only, never val, test or the unlabelled pool
    subsets = pd.read_parquet(out / "subsets.parquet")
    assert list(subsets.columns) == ["id", "task", "seed", "fraction"]
    split_of = dict(zip(*pd.read_parquet(pool_data / "manifest.parquet")[["id", "split"]].to_numpy().T))
    assert {split_of[i] for i in subsets["id"]} == {"train"}
    for name, entry in saved["protocols"].items():
        task = "regress" if name.startswith("regress") else "classify"
        for run in entry["runs"]:
            assert run["n_train"] == len(_ids(subsets, task, run["seed"], entry["fraction"]))


def _embedding_file(path, features, labels, splits):
    """An embeddings file in the embed stage's layout; rows of the 'unlabelled' split get label "" and label_id -1."""
    pool = splits == "unlabelled"
    ids = [f"img{i:04d}" for i in range(len(labels))]
    names = np.where(pool, "", np.array(["a", "b", "c"])[labels])
    label_ids = np.where(pool, -1, labels).astype(np.int64)
    flat = pa.array(features.reshape(-1))
    pq.write_table(pa.table({"id": ids, "split": splits, "label": names, "label_id": label_ids,
                             "embedding": pa.FixedSizeListArray.from_arrays(flat, features.shape[1])}), path)
    return pd.DataFrame({"id": ids, "split": splits, "label": names, "label_id": label_ids})


def test_linear_probe_on_separable_features_beats_chance(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 120)
    centres = rng.normal(size=(3, 16)) * 3
    features = (centres[labels] + rng.normal(size=(len(labels), 16))).astype(np.float32)
    splits = np.array(["train", "train", "val", "test", "train", "unlabelled"] * 60)
    rows = _embedding_file(tmp_path / "e.parquet", features, labels, splits)
    cfg = default_section("label_efficiency", protocols=["linear"])
    subsets = draw_subsets(labelled_rows(rows), cfg, "log10_m_axion", "axion", tmp_path / "e.parquet")
    result = linear_study(tmp_path / "e.parquet", subsets, ["a", "b", "c"], cfg)
    assert [result[f"linear@{f}"]["n_train"] for f in FRACTIONS] == [3, 18, 180]
    assert result["linear@100"]["metrics"]["accuracy"] > 0.9 and result["linear@100"]["metrics"]["macro_auc"] > 0.95
    assert result["linear@1"]["metrics"]["accuracy"] > 0.6  # one image a class still beats chance (1/3) clearly
    assert all(r["C"] in cfg["linear"]["Cs"] for r in result["linear@10"]["runs"])  # C chosen on val from the grid
