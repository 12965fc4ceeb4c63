"""Tests for ssl4sci.evaluate: protocols against brute-force references, chunking, errors."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import BIO, EVALUATE_CFG, blobs, taxonomy_file, write_embeddings

from ssl4sci.evaluate import evaluate
from ssl4sci.knn import knn_true_class_rank, l2_normalize
from ssl4sci.registry.protocols import protocols_of

CLASSES = ["no_sub", "cdm", "axion"]


CFG = EVALUATE_CFG


PROTOCOLS = protocols_of("split")


def split_dataset(rng, x_fit, y_fit, x_test, y_test):
    x = np.concatenate([x_fit, x_test])
    y = np.concatenate([y_fit, y_test])
    splits = ["train"] * len(y_fit) + ["test"] * len(y_test)
    return x, y, splits


# ----------------------------------------------------------------------------- prototype
def test_prototype_protocol_topk_and_chunking(tmp_path):
    rng = np.random.default_rng(5)
    n_classes = 8
    names = [f"c{i}" for i in range(n_classes)]
    x_fit, y_fit = blobs(rng, 12, n_classes, 10, spread=1.2)
    x_test, y_test = blobs(rng, 12, n_classes, 10, spread=1.2)
    x, y, splits = split_dataset(rng, x_fit, y_fit, x_test, y_test)
    p = write_embeddings(tmp_path / "e.parquet", x, y, splits, classes=names)

    cfg = {**CFG, "topk": [1, 2, 3, 5, 20]}
    big = evaluate(p, "prototype", cfg, tmp_path / "big.json")
    small = evaluate(p, "prototype", {**cfg, "chunk_size": 3}, tmp_path / "small.json")
    assert big["metrics"] == small["metrics"]
    assert big["per_class_accuracy"] == small["per_class_accuracy"]
    m = big["metrics"]
    assert m["top1"] <= m["top2"] <= m["top3"] <= m["top5"] <= m["top20"] == 1.0  # 20 clipped to 8 classes
    assert 0.0 < m["top1"] < 1.0

    # brute-force top-k accuracy
    xf, xt = l2_normalize(x_fit).astype(np.float64), l2_normalize(x_test).astype(np.float64)
    protos = np.stack([xf[y_fit == c].mean(0) for c in range(n_classes)])
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    order = np.argsort(-(xt @ protos.T), axis=1, kind="stable")
    for k in (1, 2, 3, 5):
        assert m[f"top{k}"] == pytest.approx((order[:, :k] == y_test[:, None]).any(1).mean())
    assert json.loads((tmp_path / "big.json").read_text())["metrics"] == m
    assert big["classes"] == names and big["n_classes"] == n_classes and big["embed_dim"] == 10


# ----------------------------------------------------------------------------- k-NN
def bruteforce_weighted_knn(x_fit, y_fit, x_test, y_test, k, t, n_classes):
    """DINO weighted k-NN: full similarity matrix, one-hot votes, stable tie-break by class index."""
    xf = x_fit / np.linalg.norm(x_fit, axis=1, keepdims=True)
    xt = x_test / np.linalg.norm(x_test, axis=1, keepdims=True)
    sims = xt.astype(np.float64) @ xf.T.astype(np.float64)
    nb = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    w = np.exp(np.take_along_axis(sims, nb, 1) / t)
    votes = np.zeros((len(xt), n_classes))
    for i in range(len(xt)):
        np.add.at(votes[i], y_fit[nb[i]], w[i])
    ranking = np.argsort(-votes, axis=1, kind="stable")  # ties -> lower class index
    top1 = (ranking[:, 0] == y_test).mean()
    top5 = (ranking[:, : min(5, n_classes)] == y_test[:, None]).any(1).mean()
    return top1, top5, ranking[:, 0]


@pytest.mark.parametrize(
    "n_classes,k,chunk,n_test",
    # the k=120 cases also split the vote computation into several row blocks
    [(3, 5, 4096, 60), (10, 20, 7, 60), (10, 1, 3, 60), (40, 30, 16, 60), (5, 120, 4096, 300), (5, 120, 50, 300)],
)
def test_knn_equals_bruteforce(tmp_path, n_classes, k, chunk, n_test):
    rng = np.random.default_rng(6 + n_classes + k)
    names = [f"c{i}" for i in range(n_classes)]
    x_fit = rng.normal(size=(150, 12)).astype(np.float32)
    y_fit = rng.integers(0, n_classes, 150)
    y_fit[:n_classes] = np.arange(n_classes)  # every class present in train
    x_test = rng.normal(size=(n_test, 12)).astype(np.float32)
    y_test = rng.integers(0, n_classes, n_test)
    x, y, splits = split_dataset(rng, x_fit, y_fit, x_test, y_test)
    p = write_embeddings(tmp_path / "e.parquet", x, y, splits, classes=names)

    res = evaluate(p, "knn", {**CFG, "knn_k": k, "chunk_size": chunk}, tmp_path / "knn.json")
    top1, top5, pred = bruteforce_weighted_knn(x_fit, y_fit, x_test, y_test, k, 0.07, n_classes)
    assert res["metrics"]["top1"] == pytest.approx(top1)
    assert res["metrics"]["top5"] == pytest.approx(top5)
    rank, ours = knn_true_class_rank(x_fit, y_fit, x_test, y_test, k, 0.07, chunk)
    np.testing.assert_array_equal(ours, pred)
    assert res["n_fit"] == 150 and res["n_score"] == n_test


def test_knn_chunked_equals_unchunked_with_duplicate_embeddings(tmp_path):
    # quantised features: many exactly tied neighbours, so tie-breaking must not depend on chunking
    rng = np.random.default_rng(13)
    x = np.round(rng.normal(size=(200, 4)), 0).astype(np.float32)
    y = rng.integers(0, 3, 200)
    splits = ["train"] * 140 + ["test"] * 60
    p = write_embeddings(tmp_path / "e.parquet", x, y, splits)
    ref = evaluate(p, "knn", {**CFG, "knn_k": 10}, tmp_path / "a.json")
    assert ref["metrics"]["top1"] <= ref["metrics"]["top5"]
    for chunk in (2, 7, 64):
        res = evaluate(p, "knn", {**CFG, "knn_k": 10, "chunk_size": chunk}, tmp_path / "b.json")
        assert res["metrics"] == ref["metrics"] and res["per_class_accuracy"] == ref["per_class_accuracy"]


# ----------------------------------------------------------------------------- linear + shared
def test_separable_data_all_protocols_perfect(tmp_path):
    rng = np.random.default_rng(7)
    x_fit, y_fit = blobs(rng, 30, 3, 16, spread=0.05)
    x_test, y_test = blobs(rng, 30, 3, 16, spread=0.05)
    x, y, splits = split_dataset(rng, x_fit, y_fit, x_test, y_test)
    p = write_embeddings(tmp_path / "e.parquet", x, y, splits)
    out = {proto: evaluate(p, proto, CFG, tmp_path / f"{proto}.json") for proto in PROTOCOLS}
    assert out["prototype"]["metrics"] == {"top1": 1.0, "top3": 1.0, "top5": 1.0}
    assert out["knn"]["metrics"] == {"top1": 1.0, "top5": 1.0}
    lin = out["linear"]["metrics"]
    assert lin["accuracy"] == 1.0 and lin["macro_auc"] == 1.0
    assert lin["auc_per_class"] == {c: 1.0 for c in CLASSES}
    for res in out.values():
        assert res["per_class_accuracy"] == {c: 1.0 for c in CLASSES}
        assert res["method"] == "dino" and res["classes"] == CLASSES
        assert res["n_fit"] == 90 and res["n_score"] == 90 and res["n_excluded"] == 0
        assert res["embeddings"] == {"path": str(p), "checkpoint_sha256": "ab" * 32, "model": "vit_tiny"}
        assert res["config"] == CFG
        assert json.loads((tmp_path / f"{res['protocol']}.json").read_text()) == res


def test_random_labels_near_chance(tmp_path):
    rng = np.random.default_rng(8)
    n = 1200
    x = rng.normal(size=(n, 16)).astype(np.float32)
    y = rng.integers(0, 3, n)
    splits = ["train"] * (n // 2) + ["test"] * (n // 2)
    p = write_embeddings(tmp_path / "e.parquet", x, y, splits)
    cfg = {**CFG, "knn_k": 20}
    for proto, key in [("prototype", "top1"), ("knn", "top1"), ("linear", "accuracy")]:
        acc = evaluate(p, proto, cfg, tmp_path / f"{proto}.json")["metrics"][key]
        assert 0.25 < acc < 0.42, (proto, acc)
    auc = json.loads((tmp_path / "linear.json").read_text())["metrics"]["macro_auc"]
    assert 0.42 < auc < 0.58


def test_linear_macro_auc_is_mean_of_per_class(tmp_path):
    rng = np.random.default_rng(9)
    x_fit, y_fit = blobs(rng, 40, 3, 8, spread=1.0)
    x_test, y_test = blobs(rng, 40, 3, 8, spread=1.0)
    x, y, splits = split_dataset(rng, x_fit, y_fit, x_test, y_test)
    p = write_embeddings(tmp_path / "e.parquet", x, y, splits)
    m = evaluate(p, "linear", CFG, tmp_path / "lin.json")["metrics"]
    assert m["macro_auc"] == pytest.approx(np.mean(list(m["auc_per_class"].values())))
    assert 0.5 < m["macro_auc"] < 1.0


def test_fit_on_train_and_val(tmp_path):
    rng = np.random.default_rng(10)
    x, y = blobs(rng, 20, 3, 8, spread=0.05)
    splits = (["train"] * 10 + ["val"] * 5 + ["test"] * 5) * 3
    p = write_embeddings(tmp_path / "e.parquet", x, y, splits)
    res = evaluate(p, "knn", {**CFG, "fit_splits": ["train", "val"]}, tmp_path / "o.json")
    assert res["n_fit"] == 45 and res["n_score"] == 15


def test_test_class_absent_from_training_is_excluded(tmp_path):
    rng = np.random.default_rng(11)
    x, _ = blobs(rng, 10, 4, 8, spread=0.05)
    y = np.repeat([0, 1, 2, 3], 10)
    names = ["no_sub", "cdm", "axion", "extra"]
    splits = (["train"] * 6 + ["test"] * 4) * 3 + ["test"] * 10  # class 3 only in test
    p = write_embeddings(tmp_path / "e.parquet", x, y, splits, classes=names)
    for proto in PROTOCOLS:
        res = evaluate(p, proto, CFG, tmp_path / f"{proto}.json")
        assert res["n_excluded"] == 10 and res["excluded_classes"] == ["extra"]
        assert res["n_score"] == 12 and res["classes"] == CLASSES

    only_new = ["train"] * 30 + ["test"] * 10
    p2 = write_embeddings(tmp_path / "e2.parquet", x, y, only_new, classes=names)
    with pytest.raises(ValueError, match="e2.parquet.*no 'test' rows have a class present"):
        evaluate(p2, "knn", CFG, tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


# ----------------------------------------------------------------------------- errors
@pytest.fixture()
def small_file(tmp_path):
    rng = np.random.default_rng(12)
    x, y = blobs(rng, 6, 3, 4, spread=0.1)
    return write_embeddings(tmp_path / "small.parquet", x, y, (["train"] * 4 + ["test"] * 2) * 3)


def test_unknown_protocol(small_file, tmp_path):
    expected = "prototype, knn, linear, prototype_seed, simpleshot, spectrum"
    with pytest.raises(ValueError, match=rf"small\.parquet: unknown protocol 'svm', expected one of {expected}$"):
        evaluate(small_file, "svm", CFG, tmp_path / "o.json")


def test_missing_embedding_column(tmp_path):
    p = write_embeddings(tmp_path / "noemb.parquet", np.ones((4, 2)), [0, 1, 2, 0], ["train"] * 3 + ["test"],
                         column="emb")
    with pytest.raises(ValueError, match=r"noemb\.parquet.*expected an 'embedding' column"):
        evaluate(p, "knn", CFG, tmp_path / "o.json")


def test_empty_split(small_file, tmp_path):
    with pytest.raises(ValueError, match=r"small\.parquet.*split 'val' has no rows"):
        evaluate(small_file, "prototype", {**CFG, "score_split": "val"}, tmp_path / "o.json")
    with pytest.raises(ValueError, match=r"split 'holdout' has no rows"):
        evaluate(small_file, "linear", {**CFG, "fit_splits": ["train", "holdout"]}, tmp_path / "o.json")
    assert not (tmp_path / "o.json").exists()


def test_score_split_in_fit_splits_rejected(small_file, tmp_path):
    with pytest.raises(ValueError, match="must not be one of fit_splits"):
        evaluate(small_file, "knn", {**CFG, "fit_splits": ["train", "test"]}, tmp_path / "o.json")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        evaluate(tmp_path / "nope.parquet", "knn", CFG, tmp_path / "o.json")


def test_non_finite_embeddings(tmp_path):
    x = np.ones((6, 2), dtype=np.float32)
    x[0, 0] = np.nan
    p = write_embeddings(tmp_path / "nan.parquet", x, [0, 1, 2, 0, 1, 2], ["train"] * 3 + ["test"] * 3)
    with pytest.raises(ValueError, match=r"nan\.parquet.*finite"):
        evaluate(p, "prototype", CFG, tmp_path / "o.json")


# ----------------------------------------------------------------------------- protocol sets, ranks, null labels
def test_protocol_sets():
    assert protocols_of("split") == ("prototype", "knn", "linear")  # the lensing default is unchanged
    assert protocols_of("fewshot") == ("prototype_seed", "simpleshot")
    assert protocols_of("label_free") == ("spectrum",)


def test_lensing_output_has_no_rank_and_no_null_labels(small_file, tmp_path):
    for proto in PROTOCOLS:
        res = evaluate(small_file, proto, CFG, tmp_path / f"{proto}.json")
        assert res["rank"] is None and res["n_null_label"] == 0
        assert res["fit_splits"] == ["train"] and res["score_split"] == "test"


def test_null_labels_excluded_and_counted(tmp_path):
    rng = np.random.default_rng(14)
    x, y = blobs(rng, 10, 3, 8, spread=0.05)
    splits = (["train"] * 6 + ["test"] * 4) * 3
    p = write_embeddings(tmp_path / "e.parquet", x, y, splits)
    t = pq.read_table(p)
    labels = t.column("label").to_pylist()
    labels[0], labels[7], labels[8] = None, None, " "  # one train row, two test rows (blank = null)
    t = t.drop_columns(["label_id"]).set_column(t.schema.get_field_index("label"), "label", pa.array(labels))
    pq.write_table(t, p)
    res = evaluate(p, "knn", CFG, tmp_path / "o.json")
    assert res["n_null_label"] == 3 and res["n_fit"] == 17 and res["n_score"] == 10
    assert res["classes"] == sorted(CLASSES) and res["metrics"]["top1"] == 1.0


def test_rank_with_fit_score_protocols_and_label_default(tmp_path):
    p, _ = taxonomy_file(tmp_path)
    t = pq.read_table(p)
    splits = np.where(np.arange(t.num_rows) % 3 == 0, "test", "train")
    pq.write_table(t.set_column(1, "split", pa.array(splits)), p)
    for proto in protocols_of("split"):
        res = evaluate(p, proto, CFG, tmp_path / f"{proto}.json", rank="genus")
        acc = res["metrics"]["accuracy" if proto == "linear" else "top1"]
        assert acc == 1.0 and res["n_null_label"] == 5 and res["rank"] == "genus"
        assert res["n_fit"] + res["n_score"] == 240 - 5
    res = evaluate(p, "prototype", CFG, tmp_path / "x.json")  # no rank: the 'label' column
    assert res["rank"] is None and res["n_classes"] == 20


def test_rank_errors(tmp_path):
    p, _ = taxonomy_file(tmp_path)
    with pytest.raises(ValueError, match=r"tax\.parquet.*unknown rank 'tribe'"):
        evaluate(p, "prototype_seed", BIO, tmp_path / "o.json", rank="tribe")
    with pytest.raises(ValueError, match=r"tax\.parquet.*expected a 'order' column for rank='order'"):
        evaluate(p, "simpleshot", BIO, tmp_path / "o.json", rank="order")
    with pytest.raises(ValueError, match="unknown protocol 'fewshot'.*prototype_seed, simpleshot"):
        evaluate(p, "fewshot", BIO, tmp_path / "o.json")


# ----------------------------------------------------------------------------- spectrum (dimensional collapse)
def test_spectrum_measures_the_fit_split_without_reading_labels(tmp_path):
    """Train rows spread along 3 equal orthogonal directions, test rows along all 8: the protocol sees the train rows
    only (rank 3, PC1 a third of the variance) and needs no label column."""
    corners = np.array(np.meshgrid(*[[-1.0, 1.0]] * 3)).reshape(3, -1).T  # 8 rows, equal variance on 3 axes
    train = np.zeros((8, 8), dtype=np.float32)
    train[:, [1, 4, 6]] = corners
    test = np.random.default_rng(20).normal(size=(8, 8)).astype(np.float32)
    splits = ["train"] * 8 + ["test"] * 8
    p = write_embeddings(tmp_path / "e.parquet", np.concatenate([train, test]) + 5.0, [0] * 16, splits)
    t = pq.read_table(p)
    pq.write_table(t.drop_columns(["label", "label_id"]).replace_schema_metadata(t.schema.metadata), p)
    res = evaluate(p, "spectrum", CFG, tmp_path / "spectrum.json")
    m = res["metrics"]
    assert m["effective_rank"] == pytest.approx(3.0, rel=1e-6) and m["effective_rank_ratio"] == pytest.approx(3 / 8)
    assert m["pc1_share"] == pytest.approx(1 / 3) and m["pc2_share"] == pytest.approx(2 / 3)
    assert m["embed_dim"] == 8 and m["n"] == 8 and res["n_fit"] == 8 and res["fit_splits"] == ["train"]
    assert res["protocol"] == "spectrum" and res["method"] == "dino" and res["rank"] is None
    assert json.loads((tmp_path / "spectrum.json").read_text())["metrics"] == m  # strict JSON: no NaN
    whole = evaluate(p, "spectrum", {**CFG, "fit_splits": ["train", "test"]}, tmp_path / "both.json")["metrics"]
    assert whole["n"] == 16 and whole["effective_rank"] > 3.0


def test_spectrum_refuses_a_taxonomic_rank_and_an_empty_fit_split(small_file, tmp_path):
    with pytest.raises(ValueError, match="uses no labels"):
        evaluate(small_file, "spectrum", CFG, tmp_path / "o.json", rank="genus")
    with pytest.raises(ValueError, match=r"evaluate\.fit_splits \['val'\]"):
        evaluate(small_file, "spectrum", {**CFG, "fit_splits": ["val"]}, tmp_path / "o.json")
