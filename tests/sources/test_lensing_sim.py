"""Tests of the strong-lensing simulator (ssl4sci.sources.lensing_sim) on tiny images."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from conftest import default_section

from ssl4sci.config import ConfigError, validate_config
from ssl4sci.sources import lensing_sim as ls

OUTPUTS = {"images.npy", "arc_masks.npy", "truth.parquet", "rejects.parquet", "provenance.json"}


SIMULATE = default_section("simulate")


def tiny_cfg(**over):
    cfg = dict(SIMULATE)
    cfg.update(
        n_per_class=3,
        image_size=24,
        pixel_scale=0.2,  # 4.8 arcsec field: the 1.66 arcsec Einstein ring fits
        vortex_length_range=[0.05, 2.0],
        seed=7,
    )
    cfg.update(over)
    return cfg


@pytest.fixture(scope="module")
def run1(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim1")
    cfg = tiny_cfg()
    ls.simulate(cfg, out, threads=1, progress=False)
    return cfg, out


def _load(out):
    images = np.load(out / "images.npy")
    masks = np.load(out / "arc_masks.npy")
    truth = pd.read_parquet(out / "truth.parquet")
    return images, masks, truth


def test_files_shapes_and_dtypes(run1):
    cfg, out = run1
    assert {p.name for p in out.iterdir()} == OUTPUTS  # and no temporary files
    images, masks, truth = _load(out)
    assert images.dtype == np.float32 and images.shape == (9, 1, 24, 24)
    assert masks.dtype == np.bool_ and masks.shape == (9, 24, 24)
    assert np.isfinite(images).all()
    assert list(truth.columns) == list(ls.TRUTH_COLUMNS)
    assert truth["id"].tolist() == [f"sim-{i:06d}" for i in range(9)]
    assert truth["index"].tolist() == list(range(9))
    assert truth["label"].tolist() == ["no_sub"] * 3 + ["cdm"] * 3 + ["axion"] * 3
    assert (truth["seed"] == 7).all()
    assert truth["exposure_time"].between(*cfg["exposure_time_range"]).all()
    assert (truth[["source_x", "source_y"]].abs() <= cfg["source_position_max"]).all().all()
    rejects = pd.read_parquet(out / "rejects.parquet")
    assert list(rejects.columns) == ["path", "reason"] and len(rejects) == 0
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["source"] == "lensing_sim"
    assert prov["cfg"]["image_size"] == 24 and prov["n_images"] == 9
    assert prov["lenstronomy_version"] and prov["timestamp_utc"]


@pytest.mark.parametrize("start_method", [None, "spawn"])  # automatic (fork on Linux) and spawn
def test_deterministic_across_workers_and_chunking(run1, tmp_path, monkeypatch, start_method):
    cfg, out1 = run1
    monkeypatch.setattr(ls, "_START_METHOD", start_method)
    ls.simulate(cfg, tmp_path, threads=2, progress=False)
    prov = json.loads((tmp_path / "provenance.json").read_text())
    assert prov["threads"] == 2 and prov["start_method"] == (start_method or ls._start_method())
    assert {p.name for p in tmp_path.iterdir()} == OUTPUTS
    im1, m1, t1 = _load(out1)
    im2, m2, t2 = _load(tmp_path)
    np.testing.assert_array_equal(im1, im2)
    np.testing.assert_array_equal(m1, m2)
    pd.testing.assert_frame_equal(t1, t2)
    # any single image, drawn alone and in any order, is the same as in the data set
    for i in (8, 0, 4):
        label = t1.loc[i, "label"]
        img, mask, truth = ls.simulate_one(cfg, label, i)
        np.testing.assert_array_equal(img, im1[i, 0])
        np.testing.assert_array_equal(mask, m1[i])
        assert truth["n_subhalos"] == t1.loc[i, "n_subhalos"]
    # a different seed gives a different image
    other, _, _ = ls.simulate_one({**cfg, "seed": 8}, "cdm", 4)
    assert not np.array_equal(other, im1[4, 0])


def test_classes_differ_as_expected(run1):
    cfg, out = run1
    _, _, truth = _load(out)
    no_sub = truth[truth.label == "no_sub"]
    cdm = truth[truth.label == "cdm"]
    axion = truth[truth.label == "axion"]
    assert (no_sub.n_subhalos == 0).all() and no_sub.log10_m_axion.isna().all()
    assert (cdm.n_subhalos >= 0).all() and cdm.n_subhalos.sum() > 0 and cdm.log10_m_axion.isna().all()
    lo, hi = cfg["axion_log10_mass_range"]
    assert np.isfinite(axion.log10_m_axion).all() and axion.log10_m_axion.between(lo, hi).all()
    assert (axion.n_subhalos == cfg["vortex_n_points"]).all()
    # subhalo counts are Poisson: their mean over many draws is close to the configured mean
    counts = [ls.simulate_one(tiny_cfg(image_size=16, pixel_scale=0.3, supersampling_factor=1,
                                       cdm_n_subhalos_mean=4.0), "cdm", i)[2]["n_subhalos"]
              for i in range(60)]
    assert abs(np.mean(counts) - 4.0) < 1.0


def test_substructure_changes_the_lensed_image():
    # the same index shares lens, source and exposure draws; without noise only substructure differs
    cfg = tiny_cfg(background_rms=0.0, exposure_time_range=[1e9, 1e9])
    base, _, _ = ls.simulate_one(cfg, "no_sub", 5)
    cdm, _, t_cdm = ls.simulate_one({**cfg, "cdm_n_subhalos_mean": 30.0, "cdm_mass_range": [1e9, 1e10]}, "cdm", 5)
    axion, _, _ = ls.simulate_one(cfg, "axion", 5)
    assert t_cdm["n_subhalos"] > 0
    scale = np.abs(base).max()
    assert np.abs(cdm - base).max() > 1e-3 * scale
    assert np.abs(axion - base).max() > 1e-3 * scale


def test_arc_mask_marks_the_bright_arcs(run1):
    _, out = run1
    images, masks, _ = _load(out)
    for img, mask in zip(images[:, 0], masks):
        assert 0 < mask.sum() < mask.size
        assert img[mask].mean() > img[~mask].mean()


def test_einstein_radius_matches_the_point_mass_relation(run1):
    from astropy import constants as const
    from astropy import units as u
    from astropy.cosmology import FlatLambdaCDM

    cfg, out = run1
    cosmo = FlatLambdaCDM(H0=cfg["H0"], Om0=cfg["Om0"], Ob0=cfg["Ob0"])
    d_l = cosmo.angular_diameter_distance(cfg["z_lens"])
    d_s = cosmo.angular_diameter_distance(cfg["z_source"])
    # flat universe: D_ls = (D_M(z_s) - D_M(z_l)) / (1 + z_s)
    d_ls = (cosmo.comoving_transverse_distance(cfg["z_source"])
            - cosmo.comoving_transverse_distance(cfg["z_lens"])) / (1 + cfg["z_source"])
    theta = np.sqrt(4 * const.G * cfg["halo_mass"] * u.Msun / const.c ** 2 * d_ls / (d_l * d_s)).decompose()
    expected = (theta.value * u.rad).to(u.arcsec).value
    _, _, truth = _load(out)
    # lenstronomy's constants (M_sun = 1.9891e30 kg, G = 6.67384e-11) differ from astropy's by ~3e-4 in G M
    np.testing.assert_allclose(truth["einstein_radius"], expected, rtol=5e-4)
    assert ls.einstein_radius_arcsec(cfg) == pytest.approx(expected, rel=5e-4)
    assert 1.5 < expected < 1.8  # ~1.66 arcsec for 1e12 M_sun at z = 0.5 -> 1.0
    # scaling for a smaller mass (used for subhalos and vortex pieces)
    assert ls.einstein_radius_arcsec(cfg, 1e10) == pytest.approx(0.1 * ls.einstein_radius_arcsec(cfg), rel=1e-9)


def test_de_broglie_length_and_mass_function():
    from astropy import constants as const
    from astropy import units as u

    m = 1e-23 * u.eV / const.c ** 2
    lam = (const.h / (m * 300 * u.km / u.s)).to(u.kpc).value
    kpc_per_arcsec = 6.1
    assert ls._de_broglie_arcsec(-23.0, 300.0, kpc_per_arcsec) == pytest.approx(lam / kpc_per_arcsec, rel=1e-6)

    rng = np.random.default_rng(0)
    for slope in (-0.9, -1.0, -1.9):
        masses = ls._power_law_masses(rng, 200_000, [1e6, 1e10], slope)
        assert masses.min() >= 1e6 and masses.max() <= 1e10
        # analytic mean of m on [a, b] with dN/dm ∝ m**slope
        a, b = 1e6, 1e10
        if slope == -1.0:
            mean = (b - a) / math.log(b / a)
        else:
            first = (b ** (slope + 2) - a ** (slope + 2)) / (slope + 2)
            mean = first / ((b ** (slope + 1) - a ** (slope + 1)) / (slope + 1))
        assert masses.mean() == pytest.approx(mean, rel=0.05)


def test_vortex_geometry_and_mass():
    # long vortices with centres drawn outside the field: their ends must be moved into the image
    cfg = tiny_cfg(vortex_length_range=[2.0, 4.0], vortex_center_radius_range=[3.0, 3.4])
    cfg, ctx = ls._context(cfg)
    half = 0.5 * cfg["image_size"] * cfg["pixel_scale"]
    for i in range(50):
        points, log10_m = ls._substructure(np.random.default_rng([0, i]), cfg, ctx, "axion")
        xy = np.array([[p["center_x"], p["center_y"]] for p in points])
        assert len(points) == cfg["vortex_n_points"]
        assert np.abs(xy).max() <= half - cfg["pixel_scale"] + 1e-9
        length = np.hypot(*(xy[-1] - xy[0]))
        lam = ls._de_broglie_arcsec(log10_m, cfg["vortex_velocity_kms"], ctx.kpc_per_arcsec)
        assert length == pytest.approx(np.clip(lam, 2.0, 4.0), rel=1e-9)
        # total mass of the points: sum of theta_E**2 scales with mass
        total = sum(p["theta_E"] ** 2 for p in points) / ctx.theta_e ** 2
        assert total == pytest.approx(cfg["vortex_mass_fraction"], rel=1e-9)
    # cdm subhalos: count, masses and positions as configured
    cfg2, ctx2 = ls._context(tiny_cfg(cdm_n_subhalos_mean=40.0))
    points, log10_m = ls._substructure(np.random.default_rng(1), cfg2, ctx2, "cdm")
    assert np.isnan(log10_m) and len(points) > 0
    m = np.array([p["theta_E"] ** 2 for p in points]) / ctx2.theta_e ** 2 * cfg2["halo_mass"]
    assert m.min() >= 1e6 * (1 - 1e-9) and m.max() <= 1e10 * (1 + 1e-9)
    r = np.array([np.hypot(p["center_x"], p["center_y"]) for p in points])
    assert r.min() >= 0.25 and r.max() <= 2.0
    points, log10_m = ls._substructure(np.random.default_rng(1), cfg2, ctx2, "no_sub")
    assert points == [] and np.isnan(log10_m)


@pytest.mark.parametrize(
    "over, key",
    [
        ({"pixel_scale": -1}, "simulate.pixel_scale"),
        ({"n_per_class": 0}, "simulate.n_per_class"),
        ({"classes": ["cdm", "wdm"]}, "simulate.classes.1"),
        ({"seed": 1.5}, "simulate.seed"),
        ({"psf_fwhm": "wide"}, "simulate.psf_fwhm"),
        ({"no_such_key": 1}, "simulate.no_such_key"),
    ],
)
def test_bad_config_value_names_the_key(over, key):
    # types, bounds and keys are the schema's: the config check names the key before any job starts
    with pytest.raises(ConfigError) as err:
        validate_config({"simulate": over})
    msg = str(err.value)
    assert msg.startswith(f"config key '{key}': ") and "\n" not in msg


@pytest.mark.parametrize(
    "over, key",
    [
        ({"cdm_mass_range": [1e10, 1e6]}, "simulate.cdm_mass_range"),
        ({"Ob0": 0.5}, "simulate.Ob0"),
        ({"z_source": 0.3}, "simulate.z_source"),
        ({"image_size": 12}, "simulate.image_size"),  # 2.4 arcsec field < ring diameter
        ({"vortex_length_range": [0.1, 5.0]}, "simulate.vortex_length_range"),
    ],
)
def test_bad_physics_names_the_key(tmp_path, over, key):
    # constraints between keys, which the schema cannot express, are the simulator's
    with pytest.raises(ValueError) as err:
        ls.simulate(tiny_cfg(**over), tmp_path, progress=False)
    msg = str(err.value)
    assert msg.startswith(key + ":") and "\n" not in msg
    assert list(tmp_path.iterdir()) == []


def test_vortex_clip_only_checked_for_axion(tmp_path):
    cfg = tiny_cfg(classes=["no_sub"], n_per_class=1, vortex_length_range=[0.1, 50.0])
    ls.simulate(cfg, tmp_path, progress=False)
    assert np.load(tmp_path / "images.npy").shape == (1, 1, 24, 24)


def test_no_files_left_after_a_failure(tmp_path, monkeypatch):
    real = ls.simulate_one

    def flaky(cfg, label, index):
        if index == 4:
            raise RuntimeError("boom")
        return real(cfg, label, index)

    monkeypatch.setattr(ls, "simulate_one", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        ls.simulate(tiny_cfg(), tmp_path, threads=1, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_no_files_left_after_a_worker_failure(tmp_path, monkeypatch):
    # a worker process fails (bad label reaches simulate_one through a broken plan)
    cfg = tiny_cfg(n_per_class=2)
    monkeypatch.setattr(ls, "_START_METHOD", "spawn")
    orig = ls._plan
    monkeypatch.setattr(ls, "_plan", lambda c: orig(c)[:-1] + [("wdm", 5)])
    with pytest.raises(ValueError, match="label"):
        ls.simulate(cfg, tmp_path, threads=2, progress=False)
    assert list(tmp_path.iterdir()) == []
