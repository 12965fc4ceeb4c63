"""Tests of the DeepLense data-set reader (ssl4sci.sources.deeplense) on small fixture folders."""
from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pandas as pd
import pytest
from conftest import RAMP_SIDE, axion_pair, deeplense_cfg, deeplense_with_bad_files, ramp_image

from ssl4sci.config import ConfigError, validate_config
from ssl4sci.sources import deeplense as dl

H = W = RAMP_SIDE
OUTPUTS = {"images.npy", "truth.parquet", "rejects.parquet", "provenance.json"}


@pytest.mark.parametrize("old_names", [False, True])
def test_reads_both_naming_conventions(tmp_path, monkeypatch, old_names):
    monkeypatch.setattr(dl, "_COPY_BLOCK", 4)  # compaction after rejects runs over several blocks
    root = deeplense_with_bad_files(tmp_path / "data", old_names=old_names)
    out = tmp_path / "out"
    dl.read_folder(deeplense_cfg(root), out, progress=False)
    assert {p.name for p in out.iterdir()} == OUTPUTS  # no arc masks, no temporary files

    images = np.load(out / "images.npy")
    assert images.dtype == np.float32 and images.shape == (6, 1, H, W)
    truth = pd.read_parquet(out / "truth.parquet")
    assert truth["label"].tolist() == ["no_sub"] * 2 + ["cdm"] * 2 + ["axion"] * 2
    assert truth["id"].tolist() == ["no_sub/no_sim_1", "no_sub/no_sim_2", "cdm/cdm_sim_a", "cdm/cdm_sim_b",
                                    "axion/axion_sim_1", "axion/axion_sim_2"]
    assert truth["index"].tolist() == list(range(6))
    np.testing.assert_allclose(images[:, 0, 0, 0], [1.0, 2.0, 10.0, 11.0, 20.0, 21.0])
    np.testing.assert_allclose(images[4, 0], ramp_image(20.0).astype(np.float32))
    assert truth.loc[:3, "log10_m_axion"].isna().all()
    np.testing.assert_allclose(truth.loc[4:, "log10_m_axion"], [-23.0, -22.5])
    for col in ("einstein_radius", "source_x", "source_y", "n_subhalos", "exposure_time"):
        assert col in truth.columns and truth[col].isna().all()
    assert all(p.endswith(".npy") for p in truth["path"])

    rejects = pd.read_parquet(out / "rejects.parquet")
    assert list(rejects.columns) == ["path", "reason"]
    reasons = {p.rsplit("/", 1)[-1]: r for p, r in zip(rejects["path"], rejects["reason"])}
    assert set(reasons) == {"no_sim_3.npy", "cdm_sim_c.npy", "cdm_sim_d.npy"}
    assert "wrong shape" in reasons["no_sim_3.npy"]
    assert "unreadable" in reasons["cdm_sim_c.npy"]
    assert "non-finite" in reasons["cdm_sim_d.npy"]

    prov = json.loads((out / "provenance.json").read_text())
    assert prov["source"] == "deeplense" and prov["n_images"] == 6 and prov["n_rejects"] == 3
    assert prov["n_images_per_class"] == {"no_sub": 2, "cdm": 2, "axion": 2}


def test_class_subset_and_wrong_shape_against_first_image(tmp_path):
    root = deeplense_with_bad_files(tmp_path / "data")
    np.save(root / "axion" / "axion_sim_0.npy", axion_pair(5.0, 1e-24)[0][:4], allow_pickle=True)  # plain (4, W)
    out = tmp_path / "out"
    dl.read_folder(deeplense_cfg(root, classes=["axion"]), out, progress=False)
    truth = pd.read_parquet(out / "truth.parquet")
    rejects = pd.read_parquet(out / "rejects.parquet")
    # the only plain file's header (4, 8) sets the shape (pickled pairs have none); the two (8, 8) pairs are wrong
    assert truth["id"].tolist() == ["axion/axion_sim_0"]
    assert np.isnan(truth.loc[0, "log10_m_axion"])  # a plain image in the axion folder: mass unknown
    assert len(rejects) == 2 and rejects["reason"].str.contains("wrong shape \\(8, 8\\).*is \\(4, 8\\)").all()
    assert np.load(out / "images.npy").shape == (1, 1, 4, W)


def test_pickled_files_outside_axion_and_bad_masses_are_rejected(tmp_path):
    root = deeplense_with_bad_files(tmp_path / "data")
    np.save(root / "no_sub" / "no_sim_4.npy", axion_pair(3.0, 1e-23), allow_pickle=True)
    np.save(root / "axion" / "axion_sim_3.npy", axion_pair(22.0, -1.0), allow_pickle=True)
    with open(root / "axion" / "axion_sim_4.npy", "wb") as fh:
        pickle.dump({"not": "an array"}, fh)
    out = tmp_path / "out"
    dl.read_folder(deeplense_cfg(root), out, progress=False)
    rejects = pd.read_parquet(out / "rejects.parquet")
    reasons = {p.rsplit("/", 1)[-1]: r for p, r in zip(rejects["path"], rejects["reason"])}
    assert "unreadable" in reasons["no_sim_4.npy"]          # pickles are only loaded for axion files
    assert "m_axion" in reasons["axion_sim_3.npy"]
    assert "axion_sim_4.npy" in reasons
    assert len(pd.read_parquet(out / "truth.parquet")) == 6


def test_max_per_class_is_seeded_and_deterministic(tmp_path):
    root = tmp_path / "data"
    for label in ("no_sub", "cdm"):
        (root / label).mkdir(parents=True)
        for i in range(12):
            np.save(root / label / f"{label}_{i:02d}.npy", ramp_image(float(i)))

    def ids(seed, classes=None, name="out"):
        out = tmp_path / f"{name}_{seed}_{classes}"
        dl.read_folder(deeplense_cfg(root, max_per_class=4, seed=seed, classes=classes), out, progress=False)
        return pd.read_parquet(out / "truth.parquet")["id"].tolist()

    a, b = ids(0, name="a"), ids(0, name="b")
    assert a == b and len(a) == 8
    cdm = [i for i in a if i.startswith("cdm/")]
    assert len(cdm) == 4 and cdm == sorted(cdm)            # kept in file-name order
    assert ids(0, classes=["cdm"]) == cdm                   # independent of the other classes read
    assert any(ids(s) != a for s in (1, 2, 3))              # the seed matters
    # larger than the class: everything, in order
    out = tmp_path / "all"
    dl.read_folder(deeplense_cfg(root, max_per_class=100), out, progress=False)
    assert len(pd.read_parquet(out / "truth.parquet")) == 24


def test_errors_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere") as err:
        dl.read_folder(deeplense_cfg(missing), tmp_path / "out", progress=False)
    assert "\n" not in str(err.value)

    empty = tmp_path / "empty"
    (empty / "other").mkdir(parents=True)
    with pytest.raises(ValueError, match="no class sub-folders") as err:
        dl.read_folder(deeplense_cfg(empty), tmp_path / "out", progress=False)
    assert str(empty) in str(err.value) and "\n" not in str(err.value)

    root = deeplense_with_bad_files(tmp_path / "data")
    (root / "sphere").mkdir()
    with pytest.raises(ValueError, match="two folders"):
        dl.read_folder(deeplense_cfg(root), tmp_path / "out", progress=False)

    partial = tmp_path / "partial"
    (partial / "no_sub").mkdir(parents=True)
    np.save(partial / "no_sub" / "a.npy", ramp_image(0.0))
    with pytest.raises(FileNotFoundError, match="'axion'"):
        dl.read_folder(deeplense_cfg(partial, classes=["no_sub", "axion"]), tmp_path / "out", progress=False)

    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(("settings", "expected"), [
    ({"max_per_class": 0}, "'deeplense.max_per_class': expected >= 1, got 0"),
    ({"classes": ["sphere"]}, "'deeplense.classes.0': expected one of ['no_sub', 'cdm', 'axion'], got 'sphere'"),
    ({"classes": ["cdm", "cdm"]}, "'deeplense.classes': ['cdm', 'cdm'] has non-unique elements"),
    ({"classes": []}, "'deeplense.classes': expected a list with min 1 items, got []"),
    ({"seed": -1}, "'deeplense.seed': expected >= 0, got -1"),
    ({"path": ""}, "'deeplense.path': expected a non-empty string, got ''"),
    ({"unlabelled_path": ""}, "'deeplense.unlabelled_path': expected a non-empty string, got ''"),
    ({"pth": "x"}, "'deeplense.pth': unknown key (allowed here: classes, max_per_class, path, seed, unlabelled_path)"),
])
def test_bad_settings_are_one_line_config_errors(settings, expected):
    # the schema checks the section once, before any job starts; the reader takes it as validated
    with pytest.raises(ConfigError) as err:
        validate_config({"deeplense": settings})
    assert str(err.value) == f"config key {expected}"


def test_all_files_bad_is_an_error_and_leaves_nothing(tmp_path):
    root = tmp_path / "data"
    (root / "cdm").mkdir(parents=True)
    (root / "cdm" / "x.npy").write_bytes(b"junk")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="usable image"):
        dl.read_folder(deeplense_cfg(root), out, progress=False)
    assert list(out.iterdir()) == []


def test_reread_over_existing_outputs_replaces_them(tmp_path):
    root = deeplense_with_bad_files(tmp_path / "data")
    out = tmp_path / "out"
    dl.read_folder(deeplense_cfg(root, classes=["cdm"]), out, progress=False)
    dl.read_folder(deeplense_cfg(root), out, progress=False)
    assert {p.name for p in out.iterdir()} == OUTPUTS
    assert np.load(out / "images.npy").shape[0] == 6
    assert math.isclose(float(np.load(out / "images.npy")[0, 0, 0, 0]), 1.0)
