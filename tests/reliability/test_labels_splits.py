"""Labels and splits that cannot give an honest metric: empty / NaN labels, classes too small to split, a class only
in test or missing from it, a single class. Each is either a one-line error naming the file or key and what was
expected (the run cannot go on) or a warning recorded in the output JSON (it can), never a traceback or a metric that
silently means something else."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import MODEL_CFG, default_section, make_raw
from PIL import Image

from ssl4sci.embed import embed
from ssl4sci.evaluate import evaluate
from ssl4sci.io import write_parquet
from ssl4sci.label_efficiency import draw_subsets, label_efficiency, labelled_rows
from ssl4sci.prepare import prepare
from ssl4sci.prepare_photos import prepare_photos
from ssl4sci.sources.image_folder import read_image_folder
from ssl4sci.splits import stratified_split

S = 16


def lensing_cfg(**over):
    return default_section("prepare", **{"image_size": S, "shard_size": 8, "samples_per_class": 1,
                                         "split": {"train": 0.5, "val": 0.25, "test": 0.25}, **over})


def relabel(raw: Path, labels) -> Path:
    truth = pd.read_parquet(raw / "truth.parquet")
    truth["label"] = labels
    write_parquet(raw / "truth.parquet", truth)
    return raw


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and message
    return message


# --------------------------------------------------------------------------- empty and NaN labels

def test_empty_and_nan_labels_are_rejects_not_a_class_named_empty(tmp_path):
    raw = make_raw(tmp_path / "raw", n_per_class=6, size=16)
    truth = pd.read_parquet(raw / "truth.parquet")
    labels = truth["label"].astype(object).copy()
    labels[[0, 1, 2]] = [None, "", "   "]
    truth["label"] = labels
    truth["unlabelled"] = False
    truth.loc[3, ["label", "unlabelled"]] = [None, True]  # the pool needs no label: kept
    write_parquet(raw / "truth.parquet", truth)
    stats = prepare(raw, tmp_path / "data", lensing_cfg(max_reject_fraction=0.2))
    assert stats["classes"] == ["no_sub", "cdm", "axion"]  # no class ""
    rejects = pd.read_parquet(tmp_path / "data" / "rejects.parquet")
    assert rejects[["id", "reason", "stage"]].values.tolist() == [
        [f"sim-00000{i}", "missing label", "prepare"] for i in range(3)]
    manifest = pd.read_parquet(tmp_path / "data" / "manifest.parquet")
    assert manifest.loc[manifest["id"] == "sim-000003", "split"].tolist() == ["unlabelled"]


def _photo(path: Path, seed: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (18, 24, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_photos_without_a_label_are_rejected_at_fetch_and_prepare(tmp_path):
    rows = [{"path": _photo(tmp_path / "img" / f"{c}{k}.png", 10 * i + k), "label": c}
            for i, c in enumerate("ab") for k in range(4)]
    rows += [{"path": _photo(tmp_path / "img" / "x.png", 99), "label": ""}]
    pd.DataFrame(rows).to_csv(tmp_path / "photos.csv", index=False)
    read_image_folder(default_section("image_folder", csv=str(tmp_path / "photos.csv")), tmp_path / "raw")
    fetch = pd.read_parquet(tmp_path / "raw" / "rejects.parquet")
    assert fetch[["reason", "stage"]].values.tolist() == [["no label", "fetch"]]
    # a source that lets them through: prepare rejects them itself
    meta = pd.DataFrame([{"id": Path(r["path"]).name, **r} for r in rows[:-1]])
    meta.loc[0, "label"], meta.loc[1, "label"] = None, " "
    write_parquet(tmp_path / "raw2" / "metadata.parquet", meta)
    cfg = default_section("prepare", image_size=S, resize_shorter=S, workers=1, samples_per_class=1,
                          max_reject_fraction=0.25)
    stats = prepare_photos(tmp_path / "raw2", tmp_path / "data", cfg)
    rejects = pd.read_parquet(tmp_path / "data" / "rejects.parquet")
    assert rejects[["id", "reason"]].values.tolist() == [["a0.png", "missing label"], ["a1.png", "missing label"]]
    assert stats["classes"] == ["a", "b"] and stats["n_images"] == 6


# --------------------------------------------------------------------------- classes too small to split

@pytest.mark.parametrize("fractions", [{"train": 0.7, "val": 0.1, "test": 0.2}, {"train": 0.2, "val": 0.1, "test": 0.7},
                                       {"train": 0.1, "val": 0.45, "test": 0.45}])
def test_every_class_keeps_a_train_image_and_large_classes_keep_their_proportions(fractions):
    sizes = {"one": 1, "two": 2, "three": 3, "many": 40}
    labels = pd.Series([name for name, n in sizes.items() for _ in range(n)])
    split = stratified_split(labels, fractions, seed=3)
    for name, n in sizes.items():
        mine = split[(labels == name).to_numpy()]
        assert (mine == "train").sum() >= 1, (name, list(mine))
    many = split[(labels == "many").to_numpy()]
    for part in ("val", "test"):
        assert (many == part).sum() == round(fractions[part] * 40)


def test_a_class_too_small_for_test_is_split_and_reported(tmp_path):
    raw = make_raw(tmp_path / "raw", n_per_class=4, size=16)
    relabel(raw, ["rare"] + ["common"] * 11)
    stats = prepare(raw, tmp_path / "data", lensing_cfg(split={"train": 0.2, "val": 0.1, "test": 0.7}))
    assert stats["counts"]["train"]["rare"] == 1 and stats["counts"]["test"]["rare"] == 0  # before: test only
    assert stats["warnings"] == ["1 class(es) have no val images, too few to split: 'rare'",
                                 "1 class(es) have no test images, too few to split: 'rare'"]
    assert json.loads((tmp_path / "data" / "stats.json").read_text())["warnings"] == stats["warnings"]


def test_photo_classes_below_min_count_go_to_train_and_are_reported(tmp_path):
    rows = [{"id": f"{c}{k}", "path": _photo(tmp_path / "img" / f"{c}{k}.png", 10 * i + k), "label": c}
            for i, (c, n) in enumerate({"big": 8, "tiny": 2}.items()) for k in range(n)]
    write_parquet(tmp_path / "raw" / "metadata.parquet", pd.DataFrame(rows))
    cfg = default_section("prepare", image_size=S, resize_shorter=S, workers=1, samples_per_class=1,
                          split={"train": 0.5, "val": 0.25, "test": 0.25}, min_count=3)
    stats = prepare_photos(tmp_path / "raw", tmp_path / "data", cfg)
    assert stats["small_classes_in_train"] == ["tiny"] and stats["counts"]["train"]["tiny"] == 2
    assert stats["warnings"] == ["1 class(es) have no val images, too few to split: 'tiny'",
                                 "1 class(es) have no test images, too few to split: 'tiny'"]


# --------------------------------------------------------------------------- evaluate: what the metrics cover

CLASSES = ["a", "b", "c"]


def write_embeddings(path: Path, labels, splits, seed: int = 0) -> Path:
    """An embeddings file as the embed stage writes it; features loosely clustered by class, None = no label."""
    rng = np.random.default_rng(seed)
    codes = np.array([-1 if lab is None else CLASSES.index(lab) for lab in labels])
    features = (np.eye(3, 8)[np.maximum(codes, 0)] + 0.8 * rng.normal(size=(len(labels), 8))).astype(np.float32)
    table = pa.table({"id": [f"img{i:03d}" for i in range(len(labels))], "split": list(splits), "label": list(labels),
                      "label_id": codes, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(features.ravel()), 8)})
    pq.write_table(table.replace_schema_metadata({b"method": b"dino"}), path)
    return path


def eval_cfg(**over):
    return default_section("evaluate", knn_k=3, topk=[1, 2], shots=[1], nfold=2, **over)


def test_a_single_class_stops_every_labelled_protocol_in_one_line(tmp_path):
    path = write_embeddings(tmp_path / "one.parquet", ["a"] * 12, ["train"] * 8 + ["test"] * 4)
    for protocol in ("prototype", "knn", "linear"):
        with pytest.raises(ValueError) as err:
            evaluate(path, protocol, eval_cfg(), tmp_path / f"{protocol}.json")
        assert one_line(err) == f"{path}: {protocol} expects at least 2 classes in fit_splits ['train'], found 1 ('a')"
    for protocol in ("prototype_seed", "simpleshot"):
        with pytest.raises(ValueError) as err:
            evaluate(path, protocol, eval_cfg(pool_splits=["train", "test"]), tmp_path / f"{protocol}.json")
        assert one_line(err).startswith(f"{path}: {protocol}: 1 class(es) have at least 2 images in the pool")
    assert not list(tmp_path.glob("*.json"))  # no result with a metric of 1 that means nothing
    spectrum = evaluate(path, "spectrum", eval_cfg(), tmp_path / "spectrum.json")  # needs no labels: runs
    assert spectrum["n_fit"] == 8


def test_a_class_only_in_test_is_excluded_and_named(tmp_path):
    labels = ["a"] * 6 + ["b"] * 6 + ["c"] * 4
    splits = (["train"] * 4 + ["test"] * 2) * 2 + ["test"] * 4
    path = write_embeddings(tmp_path / "e.parquet", labels, splits)
    for protocol in ("prototype", "knn", "linear"):
        result = evaluate(path, protocol, eval_cfg(), tmp_path / f"{protocol}.json")
        saved = json.loads((tmp_path / f"{protocol}.json").read_text())
        assert saved["classes"] == ["a", "b"] and saved["excluded_classes"] == ["c"] and saved["n_score"] == 4
        assert saved["warnings"] == result["warnings"] == [
            "4 'test' rows of 1 class(es) absent from fit_splits ['train'] are not scored: 'c'"]


def test_macro_auc_with_a_class_missing_from_test_is_the_mean_of_the_others_and_says_so(tmp_path):
    labels = ["a"] * 6 + ["b"] * 6 + ["c"] * 6
    splits = (["train"] * 4 + ["test"] * 2) * 2 + ["train"] * 6
    path = write_embeddings(tmp_path / "e.parquet", labels, splits)
    result = evaluate(path, "linear", eval_cfg(), tmp_path / "linear.json")
    per_class = result["metrics"]["auc_per_class"]
    assert set(per_class) == {"a", "b"}
    assert result["metrics"]["macro_auc"] == pytest.approx(np.mean(list(per_class.values())))
    assert result["warnings"] == ["1 of 3 fit classes have no 'test' rows, the metrics cover the others: 'c'"]


def test_one_class_in_test_gives_a_null_macro_auc_and_a_warning(tmp_path):
    labels = ["a"] * 6 + ["b"] * 6
    splits = ["train"] * 4 + ["test"] * 2 + ["train"] * 6
    path = write_embeddings(tmp_path / "e.parquet", labels, splits)
    result = evaluate(path, "linear", eval_cfg(), tmp_path / "linear.json")
    saved = json.loads((tmp_path / "linear.json").read_text())
    assert saved["metrics"]["macro_auc"] is None and saved["metrics"]["auc_per_class"] == {}
    assert result["warnings"] == ["1 of 2 fit classes have no 'test' rows, the metrics cover the others: 'b'",
                                  "macro_auc is null: the 'test' rows hold one class only"]


def test_rows_without_a_label_are_counted_and_left_out(tmp_path):
    labels = ["a", "b", None, "a", "b", "a", "b", None]
    splits = ["train"] * 5 + ["test"] * 3
    path = write_embeddings(tmp_path / "e.parquet", labels, splits)
    result = evaluate(path, "prototype", eval_cfg(), tmp_path / "p.json")
    assert result["n_null_label"] == 2 and result["n_fit"] == 4 and result["n_score"] == 2 and result["warnings"] == []
    with pytest.raises(ValueError) as err:
        evaluate(write_embeddings(tmp_path / "none.parquet", [None] * 4, ["train", "train", "test", "test"]),
                 "knn", eval_cfg(), tmp_path / "k.json")
    assert one_line(err) == f"{tmp_path / 'none.parquet'}: every row of fit_splits ['train'] has a null label"


def test_bio_protocols_report_classes_below_min_count(tmp_path):
    labels = ["a"] * 6 + ["b"] * 6 + ["c"]
    path = write_embeddings(tmp_path / "e.parquet", labels, ["test"] * 13)
    result = evaluate(path, "prototype_seed", eval_cfg(), tmp_path / "p.json")
    assert result["classes"] == ["a", "b"] and result["excluded_classes"] == ["c"] and result["n_excluded"] == 1


# --------------------------------------------------------------------------- label efficiency

def test_label_efficiency_refuses_a_single_class_in_one_line(tmp_path):
    rows = pd.DataFrame({"id": [f"i{k}" for k in range(6)], "label": ["a"] * 6, "label_id": 0,
                         "split": ["train"] * 4 + ["test"] * 2})
    with pytest.raises(ValueError) as err:
        draw_subsets(rows, default_section("label_efficiency", protocols=["linear"]), "log10_m_axion", "axion",
                     tmp_path / "manifest.parquet")
    assert one_line(err) == (f"{tmp_path / 'manifest.parquet'}: label_efficiency.protocols 'linear' and 'finetune' "
                             "expect train images of at least 2 classes, found 1 ('a')")


def test_label_efficiency_records_a_class_missing_from_test(tmp_path, one_torch_thread):
    raw = make_raw(tmp_path / "raw", n_per_class=5, size=16)
    relabel(raw, ["no_sub"] * 5 + ["cdm"] * 5 + ["rare"] + ["axion"] * 4)  # 'rare': one image, kept in train
    prepare(raw, tmp_path / "data", lensing_cfg(split={"train": 0.6, "val": 0.0, "test": 0.4}))
    emb = embed(tmp_path / "data", tmp_path / "random_init.parquet", "random_init", None, {"batch_size": 16, "seed": 0},
                MODEL_CFG, device="cpu")
    cfg = default_section("label_efficiency", protocols=["linear"], fractions=[100], seeds=1,
                          linear={"Cs": [1.0], "max_iter": 200})
    result = label_efficiency(tmp_path / "data", emb, tmp_path / "le", "random_init", None, cfg, MODEL_CFG,
                              regress_target="log10_m_axion", regress_label="axion", domain="lensing", device="cpu")
    saved = json.loads((tmp_path / "le" / "metrics.json").read_text())
    assert saved["warnings"] == result["warnings"] == [
        "1 class(es) have no test images, macro_auc averages the others: 'rare'"]
    assert np.isfinite(saved["protocols"]["linear@100"]["metrics"]["macro_auc"])
    manifest = labelled_rows(pd.read_parquet(tmp_path / "data" / "manifest.parquet"))
    assert set(manifest.loc[manifest["split"] == "train", "label"]) == {"no_sub", "cdm", "rare", "axion"}
