"""Strong-lensing simulator after the DeepLense "Model I" recipe, built on lenstronomy.

Each image is a galaxy-galaxy strong lens with one of three kinds of dark-matter
substructure (``no_sub``, ``cdm``, ``axion``). Every physical parameter is a key
of ``cfg`` (the validated ``simulate:`` section of the pipeline config); the config
schema (workflow/schemas/config.schema.yaml) holds the recipe values as its defaults.

Physics
-------
Cosmology
    Flat ΛCDM (``H0``, ``Om0``, ``Ob0``; astropy ``FlatLambdaCDM``), lens at
    ``z_lens`` = 0.5, source at ``z_source`` = 1.0. All distances are angular
    diameter distances from lenstronomy's ``LensCosmo``.
Main lens
    SIE (ellipticity modulus drawn from ``lens_ellipticity_range``) plus external
    shear (modulus uniform in ``[0, shear_max]``), both with random position
    angles, centred on the image. Ellipticities use lenstronomy's convention
    ``e = (1 - q) / (1 + q)``, ``(e1, e2) = e (cos 2φ, sin 2φ)``.
Einstein radius from the halo mass
    The halo mass ``halo_mass`` (1e12 M☉) is taken as the mass inside the Einstein
    radius. For any circularly symmetric lens (point mass, SIS, ...) the mean
    convergence inside θ_E is one, so ``M(<θ_E) = π Σ_crit (D_d θ_E)²``, i.e.
    ``θ_E = sqrt(4 G M / c² · D_ds / (D_d D_s))`` — the point-mass relation. The
    code inverts ``LensCosmo.mass_in_theta_E``, which is exactly this relation;
    θ_E ≈ 1.66″ for the defaults. A point mass ``m`` (a subhalo or a piece of a
    vortex) then has ``θ_E(m) = θ_E · sqrt(m / halo_mass)``.
Source
    Elliptical Sérsic profile (``SERSIC_ELLIPSE``); amplitude (counts/s/arcsec² at
    ``R_sersic``), half-light radius, Sérsic index and ellipticity modulus drawn
    uniformly from their ``*_range`` keys (a range ``[v, v]`` fixes the value, as
    the recipe does); centre uniform in the square ``|x|, |y| <= source_position_max``.
    There is no lens light.
Instrument and noise
    Gaussian PSF (FWHM ``psf_fwhm`` = 0.087″, truncated at ``psf_truncation``
    σ), rendered with ``supersampling_factor`` sub-pixels per axis. The noiseless
    image ``μ`` (counts/s per pixel) becomes ``Poisson(μ t) / t + N(0, σ_pix²)``
    with exposure time ``t`` log-uniform in ``exposure_time_range`` and
    ``σ_pix = background_rms · pixel_scale``: the background is sky-limited, its
    rms per pixel grows with the pixel side so that the noise per unit sky area
    (hence the physics) does not depend on the pixel scale. The recipe's 0.01
    counts/s in 0.05″ pixels gives ``background_rms`` = 0.2. Images are in
    counts/s per pixel (float32), not normalised.

Substructure classes
--------------------
``no_sub``
    No substructure.
``cdm``
    ``POINT_MASS`` subhalos; their number is Poisson with mean
    ``cdm_n_subhalos_mean``; masses follow ``dN/dm ∝ m^cdm_mass_slope`` on
    ``cdm_mass_range`` (inverse-CDF sampling); positions are uniform in area in the
    annulus ``cdm_position_radius_range`` (arcsec) around the lens centre, which
    covers the Einstein-ring region. The default slope −0.9 is the one with which
    the published Model I set was generated (it makes the total subhalo mass,
    ≈ 4e10 M☉ on average, comparable with the vortex mass); the ΛCDM subhalo mass
    function has a slope closer to −1.9, which can be set in the config.
``axion``
    A vortex: a straight line of ``vortex_n_points`` equal point masses with total
    mass ``vortex_mass_fraction × halo_mass``. The axion mass is drawn with
    ``log10(m / eV)`` uniform in ``axion_log10_mass_range`` ([-24, -22]). The
    vortex length is the de Broglie wavelength ``λ = h / (m v)`` at the velocity
    ``vortex_velocity_kms``, converted to an angle at ``z_lens`` with the angular
    diameter distance, then clipped to ``vortex_length_range`` (arcsec). With the
    default 300 km/s (of the order of the halo's velocity dispersion, ≈ 370 km/s
    for the SIS with the same θ_E) λ runs from ≈ 0.066″ (m = 1e-22 eV) to ≈ 6.6″
    (m = 1e-24 eV), which reproduces the length scale of the published Model I
    vortices (0.06″–6″). The upper clip must be smaller than the field of view:
    the vortex has a random orientation and its centre is drawn uniform in area in
    the annulus ``vortex_center_radius_range`` (arcsec, around the Einstein ring),
    then moved (if needed) just enough that both ends lie inside the image.

Truth and determinism
---------------------
Per image the truth holds the label, ``log10_m_axion`` (NaN unless axion),
``einstein_radius`` (arcsec), ``source_x``/``source_y`` (arcsec; x grows with the
column index, y with the row index, origin at the image centre), ``n_subhalos``
(subhalos for cdm, vortex points for axion, 0 for no_sub), ``exposure_time`` (s),
and an arc mask: pixels where the noiseless, PSF-convolved lensed source exceeds
``arc_mask_fraction`` of its peak. Every random draw of image ``index`` comes from
``np.random.default_rng([seed, index])``, so an image depends only on
``(cfg, label, index)``, never on the worker count or the chunking. Images are
ordered class by class (in the order of ``cfg['classes']``), so the global index
of an image depends on ``n_per_class`` and ``classes``.

Unlabelled pool
---------------
``n_unlabelled`` more images follow the labelled ones, simulated with the same
recipe; their classes go round the class list (image ``j`` of the pool is class
``classes[j % len(classes)]``), so the pool has the class mix of the labelled set.
They are the global indices ``n_per_class * len(classes) + j``, so adding a pool
leaves every labelled image as it was. With a pool, ``truth.parquet`` gets a
boolean column ``unlabelled``; the pool's true labels stay in the truth (the
simulator's record) and the prepare stage cuts them: pretraining alone reads the pool.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import multiprocessing as mp
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ssl4sci.io import POOL_COLUMN, atomic_path, open_memmap_reserved, write_json, write_parquet

__all__ = ["CLASSES", "simulate_one", "simulate", "einstein_radius_arcsec"]

SOURCE_NAME = "lensing_sim"
CLASSES: tuple[str, ...] = ("no_sub", "cdm", "axion")

# The [low, high] keys, in the order they are checked (so the first bad one is the one named).
RANGE_KEYS: tuple[str, ...] = (
    "lens_ellipticity_range", "source_amplitude_range", "source_r_sersic_range", "source_sersic_index_range",
    "source_ellipticity_range", "exposure_time_range", "cdm_mass_range", "cdm_position_radius_range",
    "axion_log10_mass_range", "vortex_length_range", "vortex_center_radius_range",
)

TRUTH_COLUMNS = (
    "id", "label", "index", "log10_m_axion", "einstein_radius", "source_x", "source_y",
    "n_subhalos", "exposure_time", "seed",
)

_ARCSEC = math.pi / (180.0 * 3600.0)
_FLUSH_BYTES = 256 * 2**20


# --------------------------------------------------------------------------- validation

def _bad(key: str, expected: str, got: Any) -> ValueError:
    return ValueError(f"simulate.{key}: expected {expected}, got {got!r}")


def _check_physics(cfg: dict) -> dict:
    """A copy of ``cfg`` (the validated ``simulate`` section) after the checks its schema cannot express:
    ranges with low <= high, Ob0 <= Om0, z_source > z_lens, and a field of view that holds the Einstein ring
    (and, with axions, the longest vortex)."""
    c = dict(cfg)
    if c["Ob0"] > c["Om0"]:
        raise _bad("Ob0", f"<= Om0 ({c['Om0']:g})", c["Ob0"])
    if not float(c["z_source"]) > float(c["z_lens"]):
        raise _bad("z_source", f"> {float(c['z_lens']):g}", float(c["z_source"]))
    for key in RANGE_KEYS:
        lo, hi = c[key]
        if float(lo) > float(hi):
            raise _bad(key, "low <= high", list(c[key]))
    fov = c["image_size"] * c["pixel_scale"]
    theta_e = einstein_radius_arcsec(c)
    if 2 * theta_e >= fov:
        raise ValueError(
            f"simulate.image_size: field of view {c['image_size']} x {c['pixel_scale']:g} = {fov:g} arcsec "
            f"does not contain the Einstein ring (diameter {2 * theta_e:.3g} arcsec); "
            "raise image_size or pixel_scale, or lower halo_mass")
    if "axion" in c["classes"] and c["vortex_length_range"][1] >= fov:
        raise _bad("vortex_length_range", f"an upper clip below the field of view ({fov:g} arcsec)",
                   list(c["vortex_length_range"]))
    return c


# --------------------------------------------------------------------------- physics helpers

def _lens_cosmo(cfg: dict):
    from astropy.cosmology import FlatLambdaCDM
    from lenstronomy.Cosmo.lens_cosmo import LensCosmo

    cosmo = FlatLambdaCDM(H0=float(cfg["H0"]), Om0=float(cfg["Om0"]), Ob0=float(cfg["Ob0"]))
    return LensCosmo(z_lens=float(cfg["z_lens"]), z_source=float(cfg["z_source"]), cosmo=cosmo)


def einstein_radius_arcsec(cfg: dict, mass: float | None = None) -> float:
    """Einstein radius (arcsec) of ``mass`` (default ``cfg['halo_mass']``) at the cfg redshifts.

    Inverts ``LensCosmo.mass_in_theta_E``: ``M = π Σ_crit (D_d θ_E)²``, the point-mass
    relation ``θ_E = sqrt(4GM/c² · D_ds / (D_d D_s))``.
    """
    lc = _lens_cosmo(cfg)
    m = float(cfg["halo_mass"] if mass is None else mass)
    theta_rad = math.sqrt(m / (math.pi * lc.sigma_crit)) / lc.dd  # sigma_crit in M_sun/Mpc^2, dd in Mpc
    return theta_rad / _ARCSEC


def _de_broglie_arcsec(log10_m_ev: float, velocity_kms: float, kpc_per_arcsec: float) -> float:
    """λ = h / (m v) for a particle of mass 10**log10_m_ev eV/c² at speed v, as an angle at the lens."""
    h_ev_s = 4.135667696e-15          # Planck constant [eV s]
    c_m_s = 299792458.0               # speed of light [m/s]
    kpc_m = 3.0856775814913673e19     # kiloparsec [m]
    m_ev = 10.0 ** log10_m_ev
    lam_m = h_ev_s * c_m_s ** 2 / (m_ev * velocity_kms * 1e3)   # h / (m v) with m = E / c²
    return lam_m / kpc_m / kpc_per_arcsec


class _Context:
    """Per-process objects that depend only on cfg (grid, PSF, source model, distances)."""

    def __init__(self, cfg: dict):
        import lenstronomy.Util.util as lutil
        from lenstronomy.Data.pixel_grid import PixelGrid
        from lenstronomy.Data.psf import PSF
        from lenstronomy.LightModel.light_model import LightModel

        self.cfg = cfg
        n = int(cfg["image_size"])
        d = float(cfg["pixel_scale"])
        _, _, ra0, dec0, _, _, pix2angle, _ = lutil.make_grid_with_coordtransform(
            num_pix=n, delta_pix=d, subgrid_res=1, center_ra=0, center_dec=0, inverse=False)
        self.pixel_grid = PixelGrid(nx=n, ny=n, transform_pix2angle=pix2angle,
                                    ra_at_xy_0=ra0, dec_at_xy_0=dec0)
        self.psf = PSF(psf_type="GAUSSIAN", fwhm=float(cfg["psf_fwhm"]),
                       truncation=float(cfg["psf_truncation"]), pixel_size=d)
        ss = int(cfg["supersampling_factor"])
        self.kwargs_numerics = {"supersampling_factor": ss, "supersampling_convolution": ss > 1}
        self.source_model = LightModel(["SERSIC_ELLIPSE"])
        lc = _lens_cosmo(cfg)
        self.theta_e = einstein_radius_arcsec(cfg)
        self.kpc_per_arcsec = lc.dd * 1e3 * _ARCSEC
        self.half_fov = 0.5 * n * d


_CONTEXT: dict[str, _Context] = {}


def _context(cfg: dict) -> tuple[dict, _Context]:
    key = json.dumps(cfg, sort_keys=True, default=str)
    ctx = _CONTEXT.get(key)
    if ctx is None:
        checked = _check_physics(cfg)
        key = json.dumps(checked, sort_keys=True, default=str)
        ctx = _CONTEXT.get(key)
        if ctx is None:
            if len(_CONTEXT) > 8:
                _CONTEXT.clear()
            ctx = _Context(checked)
            _CONTEXT[key] = ctx
        _CONTEXT[json.dumps(cfg, sort_keys=True, default=str)] = ctx
    return ctx.cfg, ctx


def _uniform(rng: np.random.Generator, lohi: Sequence[float]) -> float:
    lo, hi = float(lohi[0]), float(lohi[1])
    return lo + (hi - lo) * rng.random()


def _annulus(rng: np.random.Generator, rr: Sequence[float], size: int | None = None):
    """Points uniform in area in the annulus r0 <= r <= r1."""
    r0, r1 = float(rr[0]), float(rr[1])
    u = rng.random(size)
    r = np.sqrt(r0 ** 2 + (r1 ** 2 - r0 ** 2) * u)
    phi = 2 * np.pi * rng.random(size)
    return r * np.cos(phi), r * np.sin(phi)


def _power_law_masses(rng: np.random.Generator, n: int, m_range: Sequence[float], slope: float) -> np.ndarray:
    """Inverse-CDF draw from dN/dm ∝ m**slope on [m_min, m_max]."""
    m0, m1 = float(m_range[0]), float(m_range[1])
    u = rng.random(n)
    if abs(slope + 1.0) < 1e-12:
        return m0 * (m1 / m0) ** u
    a = slope + 1.0
    lo, hi = m0 ** a, m1 ** a
    return (lo + (hi - lo) * u) ** (1.0 / a)


def _substructure(rng: np.random.Generator, cfg: dict, ctx: "_Context", label: str) -> tuple[list[dict], float]:
    """POINT_MASS kwargs of the substructure of one image, and log10(m_axion / eV) (NaN unless axion)."""
    theta_e = ctx.theta_e
    halo_mass = float(cfg["halo_mass"])
    if label == "cdm":
        n = int(rng.poisson(float(cfg["cdm_n_subhalos_mean"])))
        masses = _power_law_masses(rng, n, cfg["cdm_mass_range"], float(cfg["cdm_mass_slope"]))
        xs, ys = _annulus(rng, cfg["cdm_position_radius_range"], n)
        return [{"theta_E": theta_e * math.sqrt(m / halo_mass), "center_x": float(x), "center_y": float(y)}
                for m, x, y in zip(masses, xs, ys)], float("nan")
    if label == "axion":
        log10_m = _uniform(rng, cfg["axion_log10_mass_range"])
        lam = _de_broglie_arcsec(log10_m, float(cfg["vortex_velocity_kms"]), ctx.kpc_per_arcsec)
        length = float(np.clip(lam, *cfg["vortex_length_range"]))
        ang = 2 * np.pi * rng.random()
        cx, cy = _annulus(rng, cfg["vortex_center_radius_range"])
        ux, uy = math.cos(ang), math.sin(ang)
        # move the centre just enough that both ends lie inside the image, one pixel from the edge
        margin = ctx.half_fov - float(cfg["pixel_scale"])
        lim_x = max(margin - 0.5 * length * abs(ux), 0.0)
        lim_y = max(margin - 0.5 * length * abs(uy), 0.0)
        cx, cy = float(np.clip(cx, -lim_x, lim_x)), float(np.clip(cy, -lim_y, lim_y))
        n = int(cfg["vortex_n_points"])
        offsets = np.linspace(-0.5 * length, 0.5 * length, n) if n > 1 else np.zeros(1)
        theta_pt = theta_e * math.sqrt(float(cfg["vortex_mass_fraction"]) / n)  # equal shares of the mass
        return [{"theta_E": theta_pt, "center_x": cx + o * ux, "center_y": cy + o * uy} for o in offsets], log10_m
    return [], float("nan")


# --------------------------------------------------------------------------- one image

def simulate_one(cfg: dict, label: str, index: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """(image float32 (H,W), arc_mask bool (H,W), truth dict) for one global index."""
    from lenstronomy.ImSim.image_model import ImageModel
    from lenstronomy.LensModel.lens_model import LensModel

    cfg, ctx = _context(cfg)
    if label not in CLASSES:
        raise ValueError(f"label: expected one of {list(CLASSES)}, got {label!r}")
    if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"index: expected an integer >= 0, got {index!r}")
    index = int(index)
    rng = np.random.default_rng([int(cfg["seed"]), index])
    theta_e = ctx.theta_e

    # main lens: SIE + external shear, random position angles
    e = _uniform(rng, cfg["lens_ellipticity_range"])
    phi = np.pi * rng.random()
    g = float(cfg["shear_max"]) * rng.random()
    phi_g = np.pi * rng.random()
    lens_list = ["SIE", "SHEAR"]
    kwargs_lens: list[dict] = [
        {"theta_E": theta_e, "e1": e * np.cos(2 * phi), "e2": e * np.sin(2 * phi), "center_x": 0.0, "center_y": 0.0},
        {"gamma1": g * np.cos(2 * phi_g), "gamma2": g * np.sin(2 * phi_g), "ra_0": 0.0, "dec_0": 0.0},
    ]

    # source
    pmax = float(cfg["source_position_max"])
    sx, sy = pmax * (2 * rng.random(2) - 1)
    es = _uniform(rng, cfg["source_ellipticity_range"])
    phi_s = np.pi * rng.random()
    kwargs_source = [{
        "amp": _uniform(rng, cfg["source_amplitude_range"]),
        "R_sersic": _uniform(rng, cfg["source_r_sersic_range"]),
        "n_sersic": _uniform(rng, cfg["source_sersic_index_range"]),
        "e1": es * np.cos(2 * phi_s), "e2": es * np.sin(2 * phi_s),
        "center_x": float(sx), "center_y": float(sy),
    }]

    # exposure time, log-uniform
    t_lo, t_hi = cfg["exposure_time_range"]
    exposure = float(np.exp(np.log(t_lo) + (np.log(t_hi) - np.log(t_lo)) * rng.random()))

    # substructure
    points, log10_m = _substructure(rng, cfg, ctx, label)
    n_points = len(points)
    lens_list += ["POINT_MASS"] * n_points
    kwargs_lens += points

    model = ImageModel(ctx.pixel_grid, ctx.psf, lens_model_class=LensModel(lens_list),
                       source_model_class=ctx.source_model, kwargs_numerics=ctx.kwargs_numerics)
    clean = np.asarray(model.image(kwargs_lens=kwargs_lens, kwargs_source=kwargs_source), dtype=np.float64)

    peak = float(clean.max())
    arc_mask = clean > float(cfg["arc_mask_fraction"]) * peak if peak > 0 else np.zeros(clean.shape, bool)

    counts = rng.poisson(np.clip(clean, 0.0, None) * exposure)
    sigma_pix = float(cfg["background_rms"]) * float(cfg["pixel_scale"])
    image = counts / exposure + sigma_pix * rng.standard_normal(clean.shape)

    truth = {
        "id": f"sim-{index:06d}",
        "label": label,
        "index": index,
        "log10_m_axion": log10_m,
        "einstein_radius": float(theta_e),
        "source_x": float(sx),
        "source_y": float(sy),
        "n_subhalos": n_points,
        "exposure_time": exposure,
        "seed": int(cfg["seed"]),
    }
    return image.astype(np.float32), arc_mask, truth


# --------------------------------------------------------------------------- dataset

def _plan(cfg: dict) -> list[tuple[str, int]]:
    """(label, global index) of every image: class by class, then the unlabelled pool round the classes."""
    n, classes = int(cfg["n_per_class"]), cfg["classes"]
    labelled = [(label, k * n + i) for k, label in enumerate(classes) for i in range(n)]
    pool = [(classes[j % len(classes)], len(labelled) + j) for j in range(int(cfg["n_unlabelled"]))]
    return labelled + pool


def _simulate_chunk(cfg: dict, items: Sequence[tuple[str, int]]):
    imgs, masks, truths = [], [], []
    for label, index in items:
        img, mask, truth = simulate_one(cfg, label, index)
        imgs.append(img)
        masks.append(mask)
        truths.append(truth)
    return [i for _, i in items], np.stack(imgs), np.stack(masks), truths


_START_METHOD: str | None = None  # None: automatic (see _start_method); tests may force "spawn"


def _start_method() -> str:
    """"fork" where it is safe (POSIX, no other thread running), else "spawn".

    Forked workers inherit the imported modules and the numba-compiled code, so they
    start at once, and they do not re-run the caller's ``__main__`` script (spawn and
    forkserver do, which breaks unguarded scripts such as Snakemake ``script:`` files).
    Results are identical with either method.
    """
    if _START_METHOD is not None:
        return _START_METHOD
    import threading

    if "fork" in mp.get_all_start_methods() and threading.active_count() == 1:
        return "fork"
    return "spawn"


def _bar_class():
    from tqdm import tqdm

    class _Bar(tqdm):
        monitor_interval = 0  # no monitor thread: it would make a later fork unsafe

    return _Bar


def _worker_init() -> None:
    # one image per process at a time; keep numerical libraries single-threaded
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(var, "1")


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _lenstronomy_version() -> str:
    import lenstronomy

    return str(getattr(lenstronomy, "__version__", "unknown"))


def simulate(cfg: dict, out_dir: str | Path, threads: int = 1, progress: bool = True) -> None:
    """From ``cfg`` (the validated ``simulate`` section) write out_dir/images.npy (float32, (N, 1, H, W)), arc_masks.npy
    (bool, (N, H, W)), truth.parquet (a boolean ``unlabelled`` column when ``n_unlabelled`` > 0), rejects.parquet
    (columns path, reason; empty for the simulator), provenance.json (source name, cfg, versions, timestamps)."""
    import pandas as pd
    import pyarrow as pa

    cfg = _check_physics(cfg)
    if isinstance(threads, (bool, np.bool_)) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise ValueError(f"threads: expected an integer >= 1, got {threads!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = _plan(cfg)
    n_total, size = len(plan), int(cfg["image_size"])
    threads = int(min(threads, n_total))
    chunk = max(1, min(64, math.ceil(n_total / (threads * 8))))
    truths: list[dict | None] = [None] * n_total
    started = _dt.datetime.now(_dt.timezone.utc)

    with contextlib.ExitStack() as stack:
        img_tmp = stack.enter_context(atomic_path(out_dir / "images.npy"))
        mask_tmp = stack.enter_context(atomic_path(out_dir / "arc_masks.npy"))
        images = open_memmap_reserved(img_tmp, dtype=np.float32, shape=(n_total, 1, size, size))
        masks = open_memmap_reserved(mask_tmp, dtype=np.bool_, shape=(n_total, size, size))
        method = None
        if threads == 1:
            results = (_simulate_chunk(cfg, c) for c in _chunks(plan, chunk))
        else:
            # the pool is started before the progress bar so that a forking parent has no extra thread
            method = _start_method()
            if method == "fork":
                # compile and import once here; the forked workers inherit it all
                for label in cfg["classes"]:
                    simulate_one(cfg, label, next(i for lab, i in plan if lab == label))
            pool = stack.enter_context(mp.get_context(method).Pool(threads, initializer=_worker_init))
            results = pool.imap_unordered(_star_chunk, ((cfg, c) for c in _chunks(plan, chunk)))
        bar = stack.enter_context(_bar_class()(total=n_total, desc="simulate", unit="img", file=sys.stderr,
                                       disable=not progress, dynamic_ncols=True))
        unflushed = 0
        for idx, imgs, msks, trs in results:
            lo, hi = idx[0], idx[-1] + 1  # chunks are contiguous runs of global indices
            images[lo:hi, 0] = imgs
            masks[lo:hi] = msks
            truths[lo:hi] = trs
            bar.update(len(idx))
            unflushed += imgs.nbytes + msks.nbytes
            if unflushed > _FLUSH_BYTES:  # bound the dirty page cache (counted against job memory limits)
                images.flush()
                masks.flush()
                unflushed = 0
        images.flush()
        masks.flush()
        del images, masks
        if threads > 1:
            pool.close()
            pool.join()

        df = pd.DataFrame(truths, columns=list(TRUTH_COLUMNS))
        df = df.astype({"index": "int64", "n_subhalos": "int64", "seed": "int64"})
        if cfg["n_unlabelled"]:
            df[POOL_COLUMN] = df["index"] >= n_total - int(cfg["n_unlabelled"])
        write_parquet(out_dir / "truth.parquet", df, metadata={"source": SOURCE_NAME})
        empty = pa.table({"path": pa.array([], pa.string()), "reason": pa.array([], pa.string())})
        write_parquet(out_dir / "rejects.parquet", empty, metadata={"source": SOURCE_NAME})
    # images.npy and arc_masks.npy are in place now; provenance comes last
    write_json(out_dir / "provenance.json", {
        "source": SOURCE_NAME,
        "cfg": cfg,
        "n_images": n_total,
        "n_unlabelled": int(cfg["n_unlabelled"]),
        "image_shape": [1, size, size],
        "einstein_radius_arcsec": einstein_radius_arcsec(cfg),
        "threads": threads,
        "start_method": method,
        "lenstronomy_version": _lenstronomy_version(),
        "numpy_version": np.__version__,
        "python_version": sys.version.split()[0],
        "started_utc": started.isoformat(timespec="seconds"),
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    })


def _star_chunk(args):
    return _simulate_chunk(*args)
