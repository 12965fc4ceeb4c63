"""Unlabelled pools: every source writes one, prepare cuts its labels, only pretraining reads it.

Each stage is asked which ids it used: the pool must reach pretraining and nothing after it (embeddings,
evaluation, fine-tuning), never the split, the classes or the per-split counts.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import (
    FINETUNE_CFG,
    MODEL_CFG,
    PREPARE_CFG,
    PRETRAIN_CFG,
    axion_pair,
    deeplense_cfg,
    deeplense_with_bad_files,
    default_section,
    make_raw,
    ramp_image,
    rare_species_repo,
    treeoflife_cfg,
    treeoflife_repo,
    vlm4bio_repo,
    write_photo,
)

from ssl4sci.config import ConfigError, validate_config
from ssl4sci.data import LABELLED_SPLITS, UNLABELLED, PreparedData
from ssl4sci.io import write_npy, write_parquet
from ssl4sci.prepare import prepare
from ssl4sci.prepare_photos import prepare_photos
from ssl4sci.sources import lensing_sim as ls
from ssl4sci.sources.deeplense import read_folder
from ssl4sci.sources.hub import fetch_rare_species, fetch_treeoflife, fetch_vlm4bio
from ssl4sci.sources.image_folder import read_image_folder

POOL_PER_CLASS = 2


def _ids(path: Path) -> list[str]:
    return sorted(pq.read_table(path, columns=["id"]).column("id").to_pylist())


# --------------------------------------------------------------------------- simulator

def _sim_cfg(**over):
    return default_section("simulate", **{"n_per_class": 2, "image_size": 16, "pixel_scale": 0.3,
                                          "vortex_length_range": [0.05, 2.0], "supersampling_factor": 1, "seed": 5,
                                          **over})


def test_simulator_pool_follows_the_labelled_images_unchanged(tmp_path):
    ls.simulate(_sim_cfg(), tmp_path / "plain", progress=False)
    ls.simulate(_sim_cfg(n_unlabelled=4), tmp_path / "pool", progress=False)
    plain, pooled = np.load(tmp_path / "plain" / "images.npy"), np.load(tmp_path / "pool" / "images.npy")
    truth = pd.read_parquet(tmp_path / "pool" / "truth.parquet")
    assert "unlabelled" not in pd.read_parquet(tmp_path / "plain" / "truth.parquet").columns  # no pool, no column
    assert pooled.shape[0] == 6 + 4 and np.array_equal(pooled[:6], plain)  # labelled images bit-identical
    assert np.array_equal(np.load(tmp_path / "pool" / "arc_masks.npy")[:6],
                          np.load(tmp_path / "plain" / "arc_masks.npy"))
    assert truth["unlabelled"].tolist() == [False] * 6 + [True] * 4
    # the pool goes round the classes (the labelled mix) at the next global indices, drawn from (seed, index)
    assert truth["label"].tolist()[6:] == ["no_sub", "cdm", "axion", "no_sub"]
    assert truth["id"].tolist()[6:] == [f"sim-{i:06d}" for i in range(6, 10)]
    image, _, _ = ls.simulate_one(_sim_cfg(n_unlabelled=4), "axion", 8)
    assert np.array_equal(pooled[8, 0], image)
    assert json.loads((tmp_path / "pool" / "provenance.json").read_text())["n_unlabelled"] == 4
    with pytest.raises(ConfigError, match=r"^config key 'simulate\.n_unlabelled': expected >= 0, got -1$"):
        validate_config({"simulate": {"n_unlabelled": -1}})


# --------------------------------------------------------------------------- prepare (lensing)

def _add_pool(raw: Path, n_per_class: int = POOL_PER_CLASS) -> Path:
    """Append a pool (rings of every class, true labels kept in the raw truth) to a make_raw folder."""
    extra = make_raw(raw.parent / "extra", n_per_class=n_per_class, seed=1)
    truth = pd.read_parquet(raw / "truth.parquet").assign(unlabelled=False)
    more = pd.read_parquet(extra / "truth.parquet")
    more = more.assign(id=[f"pool-{i:03d}" for i in range(len(more))], index=more["index"] + len(truth),
                       unlabelled=True)
    for name in ("images.npy", "arc_masks.npy"):
        write_npy(raw / name, np.concatenate([np.load(raw / name), np.load(extra / name)]))
    write_parquet(raw / "truth.parquet", pd.concat([truth, more], ignore_index=True))
    return raw


@pytest.fixture(scope="module")
def pooled(tmp_path_factory) -> Path:
    """A prepared data/ folder with 12 labelled images per class and a 6-image pool."""
    root = tmp_path_factory.mktemp("pooled")
    raw = _add_pool(make_raw(root / "raw", n_per_class=12))
    prepare(raw, root / "data", dict(PREPARE_CFG), source="test")
    return root / "data"


def test_prepare_marks_the_pool_and_keeps_it_out_of_splits_classes_and_counts(pooled, prepared):
    data, plain = PreparedData(pooled), PreparedData(prepared)
    m = data.manifest
    pool = m[m["split"] == UNLABELLED]
    assert sorted(pool["id"]) == [f"pool-{i:03d}" for i in range(6)]
    assert (pool["label"] == "").all() and (pool["label_id"] == -1).all() and pool["log10_m_axion"].isna().all()
    assert "unlabelled" not in m.columns  # the split says it
    # the labelled rows are split exactly as without a pool; classes and counts come from them alone
    cols = ["id", "split", "label", "label_id"]
    pd.testing.assert_frame_equal(m[m["split"] != UNLABELLED][cols].reset_index(drop=True), plain.manifest[cols])
    assert data.classes == plain.classes == ["no_sub", "cdm", "axion"]
    assert data.stats["counts"] == plain.stats["counts"] and data.stats["n_unlabelled"] == 6
    assert plain.stats["n_unlabelled"] == 0 and "unlabelled pool" in data.stats["stats_from"]
    # the statistics cover train + pool: those pixels normalise to mean 0, std 1
    rows = data.rows(["train", UNLABELLED])
    px = np.stack([data.normalise(data.raw_image(s, i)).numpy() for s, i in zip(rows["shard"], rows["index"])])
    assert abs(px.mean()) < 1e-2 and abs(px.std() - 1) < 1e-2


def test_a_source_marking_no_pool_row_changes_nothing(tmp_path, prepared):
    raw = make_raw(tmp_path / "raw", n_per_class=12)
    write_parquet(raw / "truth.parquet", pd.read_parquet(raw / "truth.parquet").assign(unlabelled=False))
    prepare(raw, tmp_path / "data", dict(PREPARE_CFG), source="test")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "data" / "manifest.parquet"),
                                  pd.read_parquet(prepared / "manifest.parquet"))


def test_prepare_needs_labelled_images(tmp_path):
    raw = make_raw(tmp_path / "raw", n_per_class=2)
    write_parquet(raw / "truth.parquet", pd.read_parquet(raw / "truth.parquet").assign(unlabelled=True))
    with pytest.raises(ValueError, match="no labelled image"):
        prepare(raw, tmp_path / "data", dict(PREPARE_CFG))


# --------------------------------------------------------------------------- DeepLense folder

def test_deeplense_unlabelled_folder(tmp_path):
    root = deeplense_with_bad_files(tmp_path / "data")
    pool = tmp_path / "pool"
    (pool / "night" / "deep").mkdir(parents=True)
    np.save(pool / "a.npy", ramp_image(30.0))
    # a pair: image kept, mass not
    np.save(pool / "night" / "deep" / "b.npy", axion_pair(31.0, 1e-23), allow_pickle=True)
    (pool / "night" / "broken.npy").write_bytes(b"not an array")
    (pool / "notes.txt").write_text("ignored")
    read_folder(deeplense_cfg(root), tmp_path / "plain", progress=False)
    read_folder(deeplense_cfg(root, unlabelled_path=str(pool)), tmp_path / "out", progress=False)
    plain = pd.read_parquet(tmp_path / "plain" / "truth.parquet")
    truth = pd.read_parquet(tmp_path / "out" / "truth.parquet")
    n = len(plain)
    pd.testing.assert_frame_equal(truth.iloc[:n].drop(columns="unlabelled"), plain)
    assert not truth["unlabelled"].iloc[:n].any()
    pool_rows = truth.iloc[n:]
    assert pool_rows["id"].tolist() == ["unlabelled/a", "unlabelled/night/deep/b"]
    assert pool_rows["unlabelled"].all() and (pool_rows["label"] == "").all()
    assert pool_rows["log10_m_axion"].isna().all()
    images = np.load(tmp_path / "out" / "images.npy")
    np.testing.assert_array_equal(images[n + 1, 0], ramp_image(31.0).astype(np.float32))
    rejects = pd.read_parquet(tmp_path / "out" / "rejects.parquet")
    assert dict(zip(rejects["path"], rejects["reason"]))[str(pool / "night" / "broken.npy")].startswith("unreadable")
    assert len(rejects) == len(pd.read_parquet(tmp_path / "plain" / "rejects.parquet")) + 1
    # a pool folder holding the class folders too: the labelled files stay out of the pool
    read_folder(deeplense_cfg(root, unlabelled_path=str(root)), tmp_path / "overlap", progress=False)
    overlap = pd.read_parquet(tmp_path / "overlap" / "truth.parquet")
    assert not overlap["unlabelled"].any() and len(overlap) == n
    # prepare: the pool rows become split unlabelled, the classes stay those of the labelled files
    stats = prepare(tmp_path / "out", tmp_path / "prepared",
                    dict(PREPARE_CFG, split={"train": 0.5, "val": 0.0, "test": 0.5}))
    manifest = pd.read_parquet(tmp_path / "prepared" / "manifest.parquet")
    assert sorted(manifest.loc[manifest["split"] == UNLABELLED, "id"]) == ["unlabelled/a", "unlabelled/night/deep/b"]
    assert stats["classes"] == ["no_sub", "cdm", "axion"] and stats["n_unlabelled"] == 2


# --------------------------------------------------------------------------- image folder + prepare_photos

def test_image_folder_unlabelled_folder_through_prepare_photos(tmp_path):
    root, pool = tmp_path / "photos", tmp_path / "wild"
    for k in range(4):
        write_photo(root / "cat" / f"c{k}.jpg", k)
        write_photo(root / "dog" / f"d{k}.png", 10 + k)
    write_photo(pool / "p0.jpg", 20)
    write_photo(pool / "deep" / "p1.png", 21)
    (pool / "deep" / "empty.jpg").write_bytes(b"")                        # rejected by the fetch
    (pool / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")     # rejected by prepare
    (pool / "readme.txt").write_text("not an image")
    prov = read_image_folder(default_section("image_folder", path=str(root), unlabelled_path=str(pool)),
                             tmp_path / "raw")
    meta = pd.read_parquet(tmp_path / "raw" / "metadata.parquet")
    assert meta["unlabelled"].tolist() == [False] * 8 + [True] * 3
    assert meta["id"].tolist()[8:] == ["unlabelled/corrupt.jpg", "unlabelled/p0.jpg", "unlabelled/deep/p1.png"]
    assert meta["label"].iloc[8:].isna().all() and prov["counts"]["unlabelled"] == 3
    assert dict(zip(pd.read_parquet(tmp_path / "raw" / "rejects.parquet")["id"],
                    pd.read_parquet(tmp_path / "raw" / "rejects.parquet")["reason"])) == {
        "unlabelled/deep/empty.jpg": "empty image file"}

    cfg = default_section("prepare", image_size=16, resize_shorter=16, split={"train": 0.5, "val": 0.25, "test": 0.25},
                          seed=0, shard_size=4, samples_per_class=2, workers=1, min_count=3, max_reject_fraction=0.5)
    stats = prepare_photos(tmp_path / "raw", tmp_path / "data", cfg)
    manifest = pd.read_parquet(tmp_path / "data" / "manifest.parquet")
    pool_rows = manifest[manifest["split"] == UNLABELLED]
    assert sorted(pool_rows["id"]) == ["unlabelled/deep/p1.png", "unlabelled/p0.jpg"]
    assert (pool_rows["label"] == "").all() and (pool_rows["label_id"] == -1).all()
    assert pool_rows["species"].isna().all()
    assert stats["classes"] == ["cat", "dog"] and stats["n_unlabelled"] == 2
    assert "unlabelled pool" in stats["stats_from"]
    assert {s: sum(c.values()) for s, c in stats["counts"].items()} == {"train": 4, "val": 2, "test": 2}
    rejects = pd.read_parquet(tmp_path / "data" / "rejects.parquet")
    assert dict(zip(rejects["id"], rejects["stage"])) == {"unlabelled/deep/empty.jpg": "fetch",
                                                          "unlabelled/corrupt.jpg": "prepare"}
    # the labelled rows split as without the pool
    read_image_folder(default_section("image_folder", path=str(root)), tmp_path / "raw_plain")
    prepare_photos(tmp_path / "raw_plain", tmp_path / "data_plain", cfg)
    plain = pd.read_parquet(tmp_path / "data_plain" / "manifest.parquet")
    labelled = manifest[manifest["split"] != UNLABELLED]
    assert dict(zip(labelled["id"], labelled["split"])) == dict(zip(plain["id"], plain["split"]))


# --------------------------------------------------------------------------- Hub sources, offline

def _pool_and_rest(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    meta = pd.read_parquet(out / "metadata.parquet")
    if "unlabelled" not in meta.columns:
        return meta.iloc[:0], meta
    return meta[meta["unlabelled"]], meta[~meta["unlabelled"]].drop(columns="unlabelled")


def test_vlm4bio_pool_is_the_images_its_metadata_does_not_list(tmp_path):
    repo = vlm4bio_repo(tmp_path / "repo")
    for k in range(3):
        write_photo(repo / "datasets" / "Fish" / "chunk_2" / f"INHS_FISH_9{k}.jpg", 40 + k)
    cfg = default_section("vlm4bio", groups=["Fish", "Butterfly"], local_path=str(repo))
    fetch_vlm4bio(cfg, tmp_path / "plain")
    fetch_vlm4bio({**cfg, "n_unlabelled": 2}, tmp_path / "two")
    prov = fetch_vlm4bio({**cfg, "n_unlabelled": 10}, tmp_path / "all")
    _, plain = _pool_and_rest(tmp_path / "plain")
    two, rest = _pool_and_rest(tmp_path / "two")
    every, _ = _pool_and_rest(tmp_path / "all")
    pd.testing.assert_frame_equal(rest.reset_index(drop=True), plain)  # the evaluation rows do not change
    assert sorted(every["id"]) == [f"Fish/INHS_FISH_9{k}.jpg" for k in range(3)]  # INHS_FISH_003 is listed: not pooled
    assert len(two) == 2 and set(two["id"]) <= set(every["id"])
    assert every[["label", "species", "genus", "kingdom"]].isna().all().all()  # provenance only, no label
    assert prov["groups"]["Fish"]["unlisted_images"] == 3 and prov["counts"]["unlabelled"] == 3
    fetch_vlm4bio({**cfg, "n_unlabelled": 2}, tmp_path / "again")
    assert _pool_and_rest(tmp_path / "again")[0]["id"].tolist() == two["id"].tolist()  # seeded


def test_treeoflife_pool_is_the_catalog_rows_max_per_species_left_out(tmp_path):
    local = treeoflife_repo(tmp_path / "ToL")
    cfg = treeoflife_cfg(local_path=str(local))
    fetch_treeoflife(cfg, tmp_path / "plain")
    prov = fetch_treeoflife({**cfg, "n_unlabelled": 5}, tmp_path / "pool")
    _, plain = _pool_and_rest(tmp_path / "plain")
    pool, rest = _pool_and_rest(tmp_path / "pool")
    # the evaluation rows do not change (their images are extracted under each run's own out dir)
    pd.testing.assert_frame_equal(rest.reset_index(drop=True).drop(columns="path"), plain.drop(columns="path"))
    assert [Path(p).name for p in rest["path"]] == [Path(p).name for p in plain["path"]]
    ravens = {"c1", "c2", "c3", "c4", "c5"}
    assert set(pool["id"]) == ravens - set(plain["id"]) and len(pool) == 2  # the two ravens not drawn, nothing else
    assert pool[["label", "species", "common", "class"]].isna().all().all() and set(pool["split"]) == {"train"}
    assert all(Path(p).is_file() for p in pool["path"])
    sel = prov["selection"]
    assert (sel["unlabelled_candidates"], sel["unlabelled_selected"]) == (2, 2) and "unlabelled_not_found" not in sel
    one = fetch_treeoflife({**cfg, "n_unlabelled": 1}, tmp_path / "one")
    assert one["counts"]["unlabelled"] == 1 and one["counts"]["kept"] == len(plain) + 1


def test_rare_species_pool_is_the_files_its_metadata_does_not_list(tmp_path):
    local = rare_species_repo(tmp_path / "rare")
    write_photo(local / "dataset" / "Animalia-extra" / "999_1_eol_full-size-copy.jpg", 77)
    fetch_rare_species(default_section("rare_species", local_path=str(local)), tmp_path / "plain")
    fetch_rare_species(default_section("rare_species", local_path=str(local), n_unlabelled=3), tmp_path / "pool")
    _, plain = _pool_and_rest(tmp_path / "plain")
    pool, rest = _pool_and_rest(tmp_path / "pool")
    pd.testing.assert_frame_equal(rest.reset_index(drop=True), plain)
    # rs-21's file is listed (no species name: rejected) and so never pooled; only the unlisted file is
    assert pool["id"].tolist() == ["unlabelled/dataset/Animalia-extra/999_1_eol_full-size-copy.jpg"]
    assert pool[["label", "species", "common"]].isna().all().all()


# --------------------------------------------------------------------------- the stages after prepare

def test_pretrain_reads_train_and_pool_ids_and_max_unlabelled_subsets(pooled):
    from ssl4sci.pretrain import pretrain_rows

    data = PreparedData(pooled)
    m = data.manifest
    train, pool = set(m.loc[m["split"] == "train", "id"]), set(m.loc[m["split"] == UNLABELLED, "id"])
    ids = lambda cfg: set(pretrain_rows(data, default_section("pretrain", **cfg))["id"])  # noqa: E731
    assert ids({"max_unlabelled": None}) == train | pool
    assert ids({}) == train | pool  # the schema's default: all of the pool
    assert ids({"max_unlabelled": 0}) == train
    two = ids({"max_unlabelled": 2})
    assert len(two - train) == 2 and two - train <= pool and ids({"max_unlabelled": 2}) == two  # seeded
    assert len({frozenset(ids({"max_unlabelled": 2, "seed": s})) for s in range(6)}) > 1
    assert ids({"max_unlabelled": 100}) == train | pool
    rows = pretrain_rows(data, default_section("pretrain"))
    assert rows.index.is_monotonic_increasing and not (rows["split"].isin(["val", "test"])).any()


def test_pretrain_checkpoint_records_what_it_read(pooled, tmp_path, capfd):
    from ssl4sci.pretrain import pretrain

    cfg = dict(PRETRAIN_CFG, epochs=1, max_steps=1, max_unlabelled=4,
               monitor={**PRETRAIN_CFG["monitor"], "every_epochs": 0})
    ckpt = pretrain(pooled, tmp_path, "dino", cfg, MODEL_CFG, device="cpu", threads=2, progress=False)
    n_train = int((PreparedData(pooled).manifest["split"] == "train").sum())
    info = torch.load(ckpt, map_location="cpu", weights_only=False)["ssl4sci"]
    assert (info["n_train"], info["n_unlabelled"]) == (n_train, 4)
    assert f"n_train={n_train} (train split), n_unlabelled=4 (of 6 in the unlabelled pool)" in capfd.readouterr().err


def test_embed_finetune_and_evaluate_never_see_the_pool(pooled, tmp_path):

    from ssl4sci.embed import embed
    from ssl4sci.evaluate import evaluate
    from ssl4sci.finetune import finetune

    m = PreparedData(pooled).manifest
    labelled = m[m["split"].isin(LABELLED_SPLITS)]
    path = embed(pooled, tmp_path / "random_init.parquet", "random_init", None, default_section("embed", batch_size=16),
                 MODEL_CFG, device="cpu")
    assert _ids(path) == sorted(labelled["id"])
    assert UNLABELLED not in set(pq.read_table(path).column("split").to_pylist())

    for task in ("classify", "regress"):
        res = finetune(pooled, tmp_path / task, "random_init", None, task, dict(FINETUNE_CFG, epochs=1), MODEL_CFG,
                       device="cpu", threads=2, progress=False, domain="lensing")
        rows = labelled if task == "classify" else labelled[labelled["label"] == "axion"]
        expected = [int((rows["split"] == s).sum()) for s in LABELLED_SPLITS]
        assert [res["n_train"], res["n_val"], res["n_test"]] == expected

    # an embeddings file that did hold pool rows still scores exactly as one without them
    table = pq.read_table(path)
    first = table.slice(0, 6).to_pandas()
    first = first.assign(id=[f"pool-{i}" for i in range(6)], split=UNLABELLED, label="", label_id=-1)
    with_pool = pa.concat_tables([table, pa.Table.from_pandas(first, schema=table.schema, preserve_index=False)])
    pq.write_table(with_pool, tmp_path / "with_pool.parquet")
    for protocol in ("knn", "prototype_seed"):
        cfg = default_section("evaluate", pool_splits=["train", "val", "test"])
        a = evaluate(path, protocol, cfg, tmp_path / f"{protocol}_a.json")
        b = evaluate(tmp_path / "with_pool.parquet", protocol, cfg, tmp_path / f"{protocol}_b.json")
        assert (a["n_fit"], a["n_score"], a["metrics"]) == (b["n_fit"], b["n_score"], b["metrics"])
