"""Tests for the biology protocols (ssl4sci.fewshot): prototype_seed, simpleshot, per-rank labels, memory."""
from __future__ import annotations

import json
import multiprocessing
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import BIO, blobs, taxonomy_file, write_embeddings, write_table
from sklearn.neighbors import NearestCentroid

from ssl4sci.config import ConfigError, validate_config
from ssl4sci.evaluate import evaluate
from ssl4sci.fewshot import (
    STREAM_PROTOTYPE_SEED,
    STREAM_SIMPLESHOT,
    chunked_argmax_dot,
    cl2n,
    id_hashes,
    n_prototype_rows,
    rank_within_class,
    row_keys,
    seed_split,
    simpleshot_centroids,
    simpleshot_predict,
    support_mask,
)
from ssl4sci.knn import l2_normalize
from ssl4sci.registry.protocols import protocols_of


def names(n):
    return [f"c{i:04d}" for i in range(n)]


def keys_of(n, seed, stream):
    return row_keys(id_hashes([f"img{i:05d}" for i in range(n)]), seed, stream)


# ----------------------------------------------------------------------------- seeded split
def test_seed_split_is_stratified_and_reproducible():
    codes = np.repeat(np.arange(5), [2, 3, 4, 10, 11])
    rng = np.random.default_rng(0)
    codes = codes[rng.permutation(len(codes))]
    keys = keys_of(len(codes), 0, STREAM_PROTOTYPE_SEED)
    proto = seed_split(codes, keys, 0.5)
    # floor(0.5 n) clipped to [1, n-1]: 2->1, 3->1, 4->2, 10->5, 11->5
    assert list(np.bincount(codes[proto])) == [1, 1, 2, 5, 5]
    assert list(n_prototype_rows(np.array([2, 3, 4, 10, 11]), 0.9)) == [1, 2, 3, 9, 9]  # always >= 1 query
    np.testing.assert_array_equal(proto, seed_split(codes, keys_of(len(codes), 0, STREAM_PROTOTYPE_SEED), 0.5))
    assert not np.array_equal(proto, seed_split(codes, keys_of(len(codes), 1, STREAM_PROTOTYPE_SEED), 0.5))
    # within-class ranks are 0..n_c-1 for every class
    r = rank_within_class(codes, keys)
    for c in range(5):
        assert sorted(r[codes == c]) == list(range((codes == c).sum()))


def test_keys_depend_on_ids_not_row_order():
    ids = np.array([f"img{i}" for i in range(50)], dtype=object)
    perm = np.random.default_rng(1).permutation(50)
    k = row_keys(id_hashes(ids), 3, 7)
    np.testing.assert_array_equal(row_keys(id_hashes(ids[perm]), 3, 7), k[perm])
    assert len(np.unique(k)) == 50
    assert not np.array_equal(row_keys(id_hashes(ids), 3, 8), k)  # another stream (fold)


# ----------------------------------------------------------------------------- prototype_seed
def test_prototype_seed_equals_nearest_centroid_with_renormalised_centroids(tmp_path):
    rng = np.random.default_rng(4)
    x, y = blobs(rng, 40, 4, 6, spread=0.9)
    p = write_embeddings(tmp_path / "e.parquet", x, y, ["test"] * len(y), classes=names(4))
    res = evaluate(p, "prototype_seed", BIO, tmp_path / "o.json")

    proto = seed_split(y, keys_of(len(y), 0, STREAM_PROTOTYPE_SEED), 0.5)
    xn = l2_normalize(x)
    nc = NearestCentroid().fit(xn[proto], y[proto])
    nc.centroids_ = l2_normalize(nc.centroids_)  # re-normalised, as in test_knn
    pred = nc.predict(xn[~proto])
    assert res["metrics"]["top1"] == pytest.approx((pred == y[~proto]).mean())
    assert 0.4 < res["metrics"]["top1"] < 1.0
    assert res["n_fit"] == 80 and res["n_score"] == 80 and res["n_pool"] == 160
    assert res["per_class_accuracy"] == {
        n: pytest.approx((pred[y[~proto] == i] == i).mean()) for i, n in enumerate(names(4))
    }

    # top-k in float64
    protos = np.stack([xn[proto & (y == c)].astype(np.float64).mean(0) for c in range(4)])
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    order = np.argsort(-(xn[~proto].astype(np.float64) @ protos.T), axis=1, kind="stable")
    for k in (1, 3):
        assert res["metrics"][f"top{k}"] == pytest.approx((order[:, :k] == y[~proto, None]).any(1).mean())
    assert res["metrics"]["top5"] == 1.0  # clipped to 4 classes
    assert res["protocol"] == "prototype_seed" and res["rank"] is None
    assert json.loads((tmp_path / "o.json").read_text()) == res


def test_prototype_seed_topk_monotone_and_chunk_independent(tmp_path):
    rng = np.random.default_rng(5)
    x, y = blobs(rng, 15, 12, 10, spread=1.3)
    p = write_embeddings(tmp_path / "e.parquet", x, y, ["test"] * len(y), classes=names(12))
    cfg = {**BIO, "topk": [1, 2, 3, 5, 20]}
    big = evaluate(p, "prototype_seed", cfg, tmp_path / "a.json")
    small = evaluate(p, "prototype_seed", {**cfg, "chunk_size": 4}, tmp_path / "b.json")
    m = big["metrics"]
    assert m == small["metrics"] and big["per_class_accuracy"] == small["per_class_accuracy"]
    assert 0 < m["top1"] <= m["top2"] <= m["top3"] <= m["top5"] <= m["top20"] == 1.0
    assert m["top1"] < m["top5"]


def test_min_count_boundary_is_inclusive(tmp_path):
    """Classes with count < min_count are excluded; a class with exactly min_count images is kept."""
    rng = np.random.default_rng(6)
    counts = [3, 4, 5, 9]
    y = np.repeat(np.arange(4), counts)
    x, _ = blobs(rng, 1, 4, 8, spread=0.0)
    x = x[y] + 0.05 * rng.normal(size=(len(y), 8)).astype(np.float32)
    cls = ["three", "four", "five", "nine"]
    p = write_embeddings(tmp_path / "e.parquet", x, y, ["test"] * len(y), classes=cls)

    res = evaluate(p, "prototype_seed", {**BIO, "min_count": 4}, tmp_path / "o.json")
    assert res["excluded_classes"] == ["three"] and res["n_excluded"] == 3
    assert res["classes"] == ["four", "five", "nine"] and res["min_images_per_class"] == 4
    assert res["n_fit"] + res["n_score"] == 4 + 5 + 9 and res["n_pool"] == 21
    res = evaluate(p, "prototype_seed", {**BIO, "min_count": 5}, tmp_path / "o.json")
    assert res["excluded_classes"] == ["four", "three"] and res["n_excluded"] == 7

    # simpleshot needs max(shots) + 1 images (and min_count): shots [1, 3] -> 4
    res = evaluate(p, "simpleshot", {**BIO, "shots": [1, 3]}, tmp_path / "o.json")
    assert res["excluded_classes"] == ["three"] and res["min_images_per_class"] == 4
    assert res["fit_info"]["n_query"] == {"1": 4 + 5 + 9 - 3, "3": 4 + 5 + 9 - 9}
    res = evaluate(p, "simpleshot", {**BIO, "shots": [1, 3], "min_count": 5}, tmp_path / "o.json")
    assert res["excluded_classes"] == ["four", "three"] and res["n_excluded"] == 7

    with pytest.raises(ValueError, match=r"e\.parquet.*simpleshot: 1 class\(es\) have at least 6 images"):
        evaluate(p, "simpleshot", {**BIO, "shots": [5]}, tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()
    # the settings' ranges are the schema's, checked before any job starts
    with pytest.raises(ConfigError, match=r"^config key 'evaluate\.min_count': expected >= 2, got 1$"):
        validate_config({"evaluate": {"min_count": 1}})
    with pytest.raises(ConfigError, match=r"^config key 'evaluate\.proto_split_fraction': expected < 1, got 1\.0$"):
        validate_config({"evaluate": {"proto_split_fraction": 1.0}})


def test_pool_splits_default_to_score_split(tmp_path):
    rng = np.random.default_rng(7)
    x, y = blobs(rng, 10, 3, 8, spread=0.05)
    splits = (["train"] * 4 + ["test"] * 6) * 3
    p = write_embeddings(tmp_path / "e.parquet", x, y, splits)
    cfg = {**BIO, "pool_splits": None}  # the schema's default
    res = evaluate(p, "prototype_seed", cfg, tmp_path / "o.json")
    assert res["pool_splits"] == ["test"] and res["n_pool"] == 18
    res = evaluate(p, "prototype_seed", {**cfg, "pool_splits": ["train", "test"]}, tmp_path / "o.json")
    assert res["n_pool"] == 30 and res["n_fit"] == 15
    with pytest.raises(ValueError, match="split 'val' has no rows"):
        evaluate(p, "simpleshot", {**cfg, "pool_splits": ["val"]}, tmp_path / "o.json")


# ----------------------------------------------------------------------------- simpleshot
def test_simpleshot_separable_is_perfect(tmp_path):
    rng = np.random.default_rng(8)
    x, y = blobs(rng, 12, 6, 16, spread=0.05)
    p = write_embeddings(tmp_path / "e.parquet", x, y, ["test"] * len(y), classes=names(6))
    res = evaluate(p, "simpleshot", BIO, tmp_path / "o.json")
    assert res["metrics"] == {"shot1_mean": 1.0, "shot1_std": 0.0, "shot5_mean": 1.0, "shot5_std": 0.0}
    assert res["per_class_accuracy"] == {n: 1.0 for n in names(6)}
    assert res["fit_info"]["n_support"] == {"1": 6, "5": 30} and res["fit_info"]["n_query"] == {"1": 66, "5": 42}
    assert res["fit_info"]["fold_accuracy"] == {"1": [1.0] * 3, "5": [1.0] * 3}


def bruteforce_simpleshot(x, y, sup, n_classes):
    """CL2N + Euclidean nearest centroid in float64 with a full distance matrix."""
    xn = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    mu = xn[sup].mean(0)
    z = (xn - mu) / np.linalg.norm(xn - mu, axis=1, keepdims=True)
    cent = np.stack([z[sup & (y == c)].mean(0) for c in range(n_classes)])
    dist = ((z[~sup, None, :] - cent[None]) ** 2).sum(-1)
    return np.argmin(dist, axis=1)


@pytest.mark.parametrize("shot,chunk", [(1, 4096), (5, 4096), (5, 3), (2, 7)])
def test_simpleshot_cl2n_equals_bruteforce(tmp_path, shot, chunk):
    rng = np.random.default_rng(9 + shot)
    n_classes, n = 7, 140
    x = (rng.normal(size=(n, 12)) + 0.7).astype(np.float32)  # off-centre: the centring matters
    y = np.sort(rng.integers(0, n_classes, n))
    y[:n_classes * 8] = np.repeat(np.arange(n_classes), 8)  # >= 8 images per class
    y = np.sort(y)
    keys = keys_of(n, 0, STREAM_SIMPLESHOT)  # fold 0 of seed 0
    sup = support_mask(y, keys, shot)
    assert list(np.bincount(y[sup])) == [shot] * n_classes
    ref = bruteforce_simpleshot(x, y, sup, n_classes)
    ours = simpleshot_predict(x, np.flatnonzero(sup), y[sup], np.flatnonzero(~sup), n_classes, chunk)
    np.testing.assert_array_equal(ours, ref)
    assert 0.05 < (ref == y[~sup]).mean() < 0.9  # a non-trivial task

    # the protocol's fold 0 uses exactly this support set
    p = write_embeddings(tmp_path / "e.parquet", x, y, ["test"] * n, classes=names(n_classes))
    res = evaluate(p, "simpleshot", {**BIO, "shots": [shot], "nfold": 2, "chunk_size": chunk}, tmp_path / "o.json")
    assert res["fit_info"]["fold_accuracy"][str(shot)][0] == pytest.approx((ref == y[~sup]).mean())


def test_simpleshot_centroids_and_cl2n():
    rng = np.random.default_rng(17)
    x = (rng.normal(size=(60, 5)) + 1.0).astype(np.float32)
    y = np.repeat(np.arange(6), 10)
    sup = support_mask(y, keys_of(60, 2, STREAM_SIMPLESHOT), 3)
    mean, cent = simpleshot_centroids(x, np.flatnonzero(sup), y[sup], 6, chunk=4)
    xn = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    np.testing.assert_allclose(mean, xn[sup].mean(0), rtol=1e-12, atol=1e-12)
    z = cl2n(x, mean)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(z, (xn - mean) / np.linalg.norm(xn - mean, axis=1, keepdims=True), rtol=1e-12,
                               atol=1e-12)
    np.testing.assert_allclose(cent, np.stack([z[sup & (y == c)].mean(0) for c in range(6)]), rtol=1e-10, atol=1e-12)


def test_simpleshot_centring_changes_the_rule():
    """Without the support-mean centring the decision differs on off-centre data (CL2N is not a no-op)."""
    rng = np.random.default_rng(10)
    x = (rng.normal(size=(200, 6)) + 2.0).astype(np.float32)
    y = np.repeat(np.arange(10), 20)
    sup = support_mask(y, keys_of(200, 0, STREAM_SIMPLESHOT), 5)
    ours = simpleshot_predict(x, np.flatnonzero(sup), y[sup], np.flatnonzero(~sup), 10)
    xn = l2_normalize(x).astype(np.float64)
    cent = np.stack([xn[sup & (y == c)].mean(0) for c in range(10)])
    plain = np.argmin(((xn[~sup, None] - cent[None]) ** 2).sum(-1), axis=1)
    assert (ours != plain).any()
    np.testing.assert_array_equal(ours, bruteforce_simpleshot(x, y, sup, 10))


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 100])
def test_chunked_argmax_ties_go_to_lower_index(chunk):
    rng = np.random.default_rng(15)
    base = rng.integers(-3, 4, size=(4, 6)).astype(np.float32)  # integer dot products: exact ties
    table = np.concatenate([base, base, base])  # rows i, i+4, i+8 identical
    q = rng.integers(-3, 4, size=(40, 6)).astype(np.float32)
    got = chunked_argmax_dot(q, table, chunk)
    np.testing.assert_array_equal(got, np.argmax(q.astype(np.float64) @ table.T, axis=1))  # first maximum
    assert (got < 4).all()


def test_simpleshot_tied_centroids_go_to_lower_class():
    rng = np.random.default_rng(16)
    e = rng.normal(size=(3, 5)).astype(np.float32)
    emb = np.concatenate([e[[1, 1, 0]], rng.normal(size=(20, 5)).astype(np.float32)])
    # support: class 0 and class 2 have the same image, class 1 another one
    pred = simpleshot_predict(emb, np.array([0, 2, 1]), np.array([0, 1, 2]), np.arange(3, 23), 3, chunk=1)
    assert set(pred) <= {0, 1} and 0 in pred  # class 2 (a copy of class 0's centroid) never wins


def test_folds_are_seeded(tmp_path):
    rng = np.random.default_rng(11)
    x, y = blobs(rng, 15, 8, 10, spread=1.2)
    p = write_embeddings(tmp_path / "e.parquet", x, y, ["test"] * len(y), classes=names(8))
    a = evaluate(p, "simpleshot", BIO, tmp_path / "a.json")
    b = evaluate(p, "simpleshot", BIO, tmp_path / "b.json")
    c = evaluate(p, "simpleshot", {**BIO, "seed": 1}, tmp_path / "c.json")
    assert a["metrics"] == b["metrics"] and a["fit_info"] == b["fit_info"]
    assert a["fit_info"]["fold_accuracy"] != c["fit_info"]["fold_accuracy"]
    # the folds differ from each other and between seeds; 1-shot supports are nested in 5-shot ones
    n = len(y)
    s0 = [support_mask(y, keys_of(n, 0, STREAM_SIMPLESHOT + f), 5) for f in range(3)]
    s1 = [support_mask(y, keys_of(n, 1, STREAM_SIMPLESHOT + f), 5) for f in range(3)]
    assert not np.array_equal(s0[0], s0[1]) and not np.array_equal(s0[0], s1[0])
    one = support_mask(y, keys_of(n, 0, STREAM_SIMPLESHOT), 1)
    assert (one <= s0[0]).all()
    m = a["metrics"]
    assert 0 < m["shot1_mean"] < m["shot5_mean"] < 1 and m["shot1_std"] > 0
    folds = a["fit_info"]["fold_accuracy"]["5"]
    assert m["shot5_mean"] == pytest.approx(np.mean(folds)) and m["shot5_std"] == pytest.approx(np.std(folds, ddof=1))
    assert evaluate(p, "simpleshot", {**BIO, "nfold": 1}, tmp_path / "d.json")["metrics"]["shot5_std"] is None


def test_bio_protocols_do_not_depend_on_row_order(tmp_path):
    rng = np.random.default_rng(12)
    x, y = blobs(rng, 10, 6, 8, spread=1.0)
    ids = [f"img{i:05d}" for i in range(len(y))]
    perm = rng.permutation(len(y))
    p1 = write_table(tmp_path / "a.parquet", x, {"label": [names(6)[i] for i in y]})
    p2 = write_table(tmp_path / "b.parquet", x[perm], {"label": [names(6)[i] for i in y[perm]]})
    # write_table numbers ids by position: give the shuffled file the original ids
    t = pq.read_table(p2)
    pq.write_table(t.set_column(0, "id", pa.array([ids[i] for i in perm])), p2)
    for proto in protocols_of("fewshot"):
        a = evaluate(p1, proto, BIO, tmp_path / "a.json")
        b = evaluate(p2, proto, BIO, tmp_path / "b.json")
        assert a["metrics"] == b["metrics"] and a["per_class_accuracy"] == b["per_class_accuracy"]


# ----------------------------------------------------------------------------- ranks
def test_per_rank_genus_separable_species_chance(tmp_path):
    p, g = taxonomy_file(tmp_path)
    cfg = {**BIO, "min_count": 2}
    genus = evaluate(p, "prototype_seed", cfg, tmp_path / "g.json", rank="genus")
    species = evaluate(p, "prototype_seed", cfg, tmp_path / "s.json", rank="species")
    assert genus["rank"] == "genus" and json.loads((tmp_path / "g.json").read_text())["rank"] == "genus"
    assert genus["metrics"]["top1"] == 1.0 and genus["n_classes"] == 4
    assert genus["n_null_label"] == 5 and genus["n_pool"] == 240 - 5
    assert species["n_null_label"] == 0 and species["n_classes"] == 20
    assert species["metrics"]["top1"] < 0.4  # chance within the genus is 0.2
    assert species["metrics"]["top5"] > 0.7  # ... but the genus is right: the 5 congeners come first

    ss_genus = evaluate(p, "simpleshot", cfg, tmp_path / "gs.json", rank="genus")
    ss_species = evaluate(p, "simpleshot", cfg, tmp_path / "ss.json", rank="species")
    assert ss_genus["metrics"]["shot1_mean"] == 1.0 and ss_genus["metrics"]["shot5_mean"] == 1.0
    assert ss_species["metrics"]["shot5_mean"] < 0.4
    # the cfg key works like the argument; the argument wins
    fam = evaluate(p, "simpleshot", {**cfg, "rank": "family"}, tmp_path / "f.json")
    assert fam["rank"] == "family" and fam["classes"] == ["FamA", "FamB"]
    argument_wins = evaluate(p, "prototype_seed", {**cfg, "rank": "family"}, tmp_path / "f.json", rank="genus")
    assert argument_wins["rank"] == "genus"


# ----------------------------------------------------------------------------- memory
_N_ROWS = {"prototype_seed": 20_000, "simpleshot": 40_000}
_DIM, _CHUNK = 32, 256


def _memory_child(conn, path: str, small: str, protocol: str, cfg: dict) -> None:
    try:
        import torch

        torch.set_num_threads(1)  # forked child: no OpenMP pool (as DataLoader workers do)
        evaluate(small, protocol, cfg, small + ".json")  # warm-up: imports, kernels, first allocations
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # VmHWM := VmRSS

        def status(field):
            with open("/proc/self/status") as fh:
                return next(int(line.split()[1]) for line in fh if line.startswith(field + ":")) * 1024

        base = status("VmRSS")
        res = evaluate(path, protocol, cfg, path + ".json")
        conn.send({"growth": status("VmHWM") - base, "n_score": res["n_score"], "n_classes": res["n_classes"]})
    except BaseException as exc:  # pragma: no cover - reported to the parent
        conn.send({"error": repr(exc)})
    finally:
        conn.close()


def _measure(path, small, protocol, cfg) -> dict:
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_memory_child, args=(child, str(path), str(small), protocol, cfg))
    proc.start()
    child.close()
    out = parent.recv() if parent.poll(120) else {"error": "timeout"}
    proc.join(30)
    assert "error" not in out, out
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS reset needs Linux /proc")
@pytest.mark.parametrize("protocol", protocols_of("fewshot"))
def test_memory_flat_in_number_of_classes(tmp_path, protocol):
    """Peak RSS growth (torch buffers included; tracemalloc would miss them) with 200 vs 5000 classes.

    Queries, rows and dim are fixed; only the class count changes.  A queries x classes float32
    matrix would add >= 190 MB (prototype_seed) / 660 MB (simpleshot) at 5000 classes; the chunked
    sweep may only add the class tables (a few (C, D) float64/float32 arrays) plus a small constant.
    """
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pytest.skip("cannot reset the peak RSS (/proc/self/clear_refs not writable)")
    import torch  # noqa: F401  (imported once here, inherited by the forked children)

    n = _N_ROWS[protocol]
    rng = np.random.default_rng(14)
    x = rng.standard_normal((n, _DIM), dtype=np.float32)
    cfg = {**BIO, "chunk_size": _CHUNK, "nfold": 1, "topk": [1, 5]}
    small = write_embeddings(tmp_path / "warm.parquet", x[:600], np.arange(600) % 3, ["test"] * 600)
    out = {}
    for n_classes in (200, 5000):
        y = np.arange(n) % n_classes
        p = write_embeddings(tmp_path / f"c{n_classes}.parquet", x, y, ["test"] * n, classes=names(n_classes))
        out[n_classes] = _measure(p, small, protocol, cfg)
        assert out[n_classes]["n_classes"] == n_classes
    growth = out[5000]["growth"] - out[200]["growth"]
    table = 5000 * (_DIM + 1) * 8  # one float64 class table
    naive = out[5000]["n_score"] * 5000 * 4  # one queries x classes float32 matrix
    bound = 6 * table + 24 * 2**20
    assert naive > 6 * bound  # the bound is meaningful
    assert growth < bound, (protocol, out, growth / 2**20, bound / 2**20)
