"""Shared tiny fixtures: a raw folder of synthetic ring images in the layout every source writes."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ssl4sci.io import write_npy, write_parquet

if TYPE_CHECKING:  # annotations only: torch loads when a test needs it
    import torch

    from ssl4sci.ssl.crops import ContentAwareResizedCrop

CLASSES = ("no_sub", "cdm", "axion")


def make_raw(out: Path, n_per_class: int = 12, size: int = 40, seed: int = 0, channels: int = 1) -> Path:
    """Rings whose radius depends on the class, on a noisy dark sky; truth and arc masks alongside."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    images, masks, rows = [], [], []
    for ci, label in enumerate(CLASSES):
        for _ in range(n_per_class):
            radius = size * (0.15 + 0.08 * ci) + rng.normal(scale=0.5)
            clean = np.exp(-((np.hypot(yy, xx) - radius) ** 2) / 3.0)
            noisy = clean + 0.05 * rng.normal(size=clean.shape)
            images.append(np.repeat(noisy[None], channels, axis=0).astype(np.float32))
            masks.append(clean > 0.1)
            rows.append({"id": f"sim-{len(rows):06d}", "label": label, "index": len(rows),
                         "log10_m_axion": rng.uniform(-24, -22) if label == "axion" else np.nan})
    out.mkdir(parents=True, exist_ok=True)
    write_npy(out / "images.npy", np.stack(images))
    write_npy(out / "arc_masks.npy", np.stack(masks))
    write_parquet(out / "truth.parquet", pd.DataFrame(rows))
    write_parquet(out / "rejects.parquet", pd.DataFrame({"path": pd.Series(dtype=str), "reason": pd.Series(dtype=str)}))
    return out


PREPARE_CFG = {
    "image_size": 32, "crop": "dataset", "signal_sigma": 3.0, "crop_margin": 0.15, "intensity": "minmax",
    "split": {"train": 0.5, "val": 0.25, "test": 0.25}, "seed": 0, "shard_size": 7, "dtype": "float16",
    "samples_per_class": 3,
    "max_reject_fraction": 0.5,  # the fixtures hold deliberately broken files
}

MODEL_CFG = {"name": "vit_tiny_patch16_224", "patch_size": 8, "depth": 2, "drop_path_rate": 0.0}
SWIN_CFG = {**MODEL_CFG, "name": "swin_tiny_patch4_window7_224", "patch_size": 4, "window_size": 4, "embed_dim": 24,
            "depths": [2, 2], "num_heads": [2, 4]}


def default_section(section: str, **overrides):
    """A config section as the schema fills it in (what a job receives), with overrides."""
    from ssl4sci.config import validate_config

    return {**validate_config({})[section], **overrides}


@pytest.fixture
def one_torch_thread():
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """A prepared data/ folder (prepare stage run for real on the synthetic rings)."""
    from ssl4sci.prepare import prepare

    root = tmp_path_factory.mktemp("prepared")
    raw = make_raw(root / "raw", n_per_class=12)
    prepare(raw, root / "data", dict(PREPARE_CFG), source="test")
    return root / "data"


# --------------------------------------------------------------------------- SLURM
def slurm_cluster_answers() -> str | None:
    """None when a SLURM cluster with cpu and gpu partitions answers (scripts/slurm-test-cluster.sh), else why not."""
    import shutil
    import subprocess

    if shutil.which("sinfo") is None:
        return "sinfo not found (start one with: sudo scripts/slurm-test-cluster.sh start)"
    proc = subprocess.run(["sinfo", "--noheader", "--format", "%P %a"], capture_output=True, text=True)
    if proc.returncode != 0 or "gpu" not in proc.stdout or "cpu" not in proc.stdout:
        return f"no SLURM cluster with cpu and gpu partitions answers ({(proc.stderr or proc.stdout).strip()[:200]})"
    return None


@pytest.fixture(scope="session")
def cluster():
    """Skips with a reason when no SLURM cluster answers; fails instead when REQUIRE_SLURM=1 (set by .ci/run)."""
    import os

    reason = slurm_cluster_answers()
    if reason:
        if os.environ.get("REQUIRE_SLURM") == "1":
            pytest.fail(f"REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)


# --------------------------------------------------------------------------- DeepLense layout, local HTTP
def write_deeplense_folder(root: Path, images: dict[str, list[np.ndarray]], rng: np.random.Generator) -> Path:
    """The published DeepLense layout: one folder per class of .npy images; axion files ("axion", or the older
    "vort") hold an (image, axion mass in eV) object pair, as the published files do."""
    for label, arrays in images.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(arrays):
            if label in ("axion", "vort"):
                pair = np.empty(2, dtype=object)
                pair[0], pair[1] = image, 10 ** rng.uniform(-24, -22)
                np.save(root / label / f"{label}_sim_{i}.npy", pair, allow_pickle=True)
            else:
                np.save(root / label / f"{label}_sim_{i}.npy", image)
    return root


@pytest.fixture
def no_proxy(monkeypatch):
    """Requests to a test server on 127.0.0.1 go straight there, whatever proxy the machine sets."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


# --------------------------------------------------------------------------- running the workflow
REPO = Path(__file__).resolve().parents[1]


def snakemake_command(workdir: Path, configfile: Path, *args: str, profile: str | None = None) -> list[str]:
    """``snakemake`` on this repository's Snakefile in ``workdir``, with a profile (``local``, ``slurm``) or not."""
    import sys

    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(configfile)]
    return cmd + (["--profile", str(REPO / "profiles" / profile)] if profile else []) + list(args)


def env_with_cli() -> dict:
    """The environment for a workflow run: the jobs find the ``ssl4sci`` CLI of this interpreter's environment."""
    import os
    import sys

    return dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])


def run_snakemake(workdir: Path, configfile: Path, *args: str, check: bool = True):
    """A local run on 2 cores, one thread per job (the micro jobs are dominated by imports); raises with the log
    tails when ``check`` and the run fails."""
    import subprocess

    cmd = snakemake_command(workdir, configfile, "--max-threads", "1", "--cores", "2", *args)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env_with_cli(), cwd=workdir)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def planned_jobs(proc) -> dict[str, int]:
    """Rule -> job count from the 'Job stats' table of a dry run."""
    import re

    text = proc.stdout + proc.stderr
    if "Nothing to be done" in text:
        return {}
    jobs = {}
    for line in text.split("Job stats:", 1)[1].splitlines()[3:]:
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if not m:
            break
        if m.group(1) not in ("total", "all"):
            jobs[m.group(1)] = int(m.group(2))
    return jobs


# The whole DAG in about two minutes on 2 cores: tiny images, one-block ViT, one epoch, both methods.
MICRO = {
    "experiment": "micro",
    "device": "cpu",
    "simulate": {"n_per_class": 10, "n_unlabelled": 6, "image_size": 32, "pixel_scale": 0.2, "seed": 3},
    "prepare": {"image_size": 32, "split": {"train": 0.6, "val": 0.1, "test": 0.3}, "shard_size": 16,
                "samples_per_class": 2},
    "model": {"patch_size": 8, "depth": 1},
    "pretrain": {"methods": ["dino", "esvit"], "epochs": 1, "batch_size": 8, "out_dim": 64, "head_hidden_dim": 32,
                 "head_bottleneck_dim": 16, "global_crop_size": 32, "local_crop_size": 16, "local_crops_number": 2,
                 "num_workers": 0, "warmup_epochs": 0,
                 "esvit": {"model": {"name": "swin_tiny_patch4_window7_224", "patch_size": 4, "window_size": 4,
                                     "embed_dim": 24, "depths": [2, 2], "num_heads": [2, 4]}}},
    "embed": {"batch_size": 32},
    "finetune": {"methods": ["dino", "esvit", "random_init"], "epochs": 1, "batch_size": 8},
    "attention": {"images_per_class": 1, "score_images": 6},
    "label_efficiency": {"finetune": {"steps": 2, "batch_size": 4, "warmup_steps": 0}},
}


def deeplense_folder(root: Path, n_per_class: int = 8, size: int = 40, seed: int = 0) -> Path:
    """Rings whose radius depends on the class, on a noisy sky, in the published DeepLense layout."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    images = {label: [(np.exp(-((np.hypot(yy, xx) - size * (0.15 + 0.08 * ci)) ** 2) / 3.0)
                       + 0.05 * rng.normal(size=(size, size))).astype(np.float32) for _ in range(n_per_class)]
              for ci, label in enumerate(CLASSES)}
    return write_deeplense_folder(root, images, rng)


def deeplense_config(folder: Path) -> dict:
    """MICRO on a DeepLense folder, with the site setting a 2-core laptop or node wants: two one-thread jobs."""
    import copy

    return {**copy.deepcopy(MICRO), "experiment": "dl", "source": "deeplense", "deeplense": {"path": str(folder)},
            "slurm": {"max_threads": 1}}


# --------------------------------------------------------------------------- DeepLense files of every kind (8x8)
RAMP_SIDE = 8


def ramp_image(value: float) -> np.ndarray:
    """An 8x8 float64 image: ``value`` plus a small ramp, so the first pixel is ``value`` and no two pixels match."""
    return np.full((RAMP_SIDE, RAMP_SIDE), value, dtype=np.float64) + np.arange(RAMP_SIDE ** 2).reshape(
        RAMP_SIDE, RAMP_SIDE) / 100.0


def axion_pair(value: float, mass_ev: float) -> np.ndarray:
    """A published axion file's content: the object array [image, m_axion in eV]."""
    arr = np.empty(2, dtype=object)
    arr[0] = ramp_image(value)
    arr[1] = mass_ev
    return arr


def deeplense_with_bad_files(root: Path, old_names: bool = False) -> Path:
    """Three classes with good files plus one corrupt, one wrong-shape, one non-finite file."""
    names = ("no", "sphere", "vort") if old_names else ("no_sub", "cdm", "axion")
    no, cdm, ax = (root / n for n in names)
    for d in (no, cdm, ax):
        d.mkdir(parents=True)
    np.save(no / "no_sim_2.npy", ramp_image(2.0))
    np.save(no / "no_sim_1.npy", ramp_image(1.0).astype(np.float32))
    np.save(no / "no_sim_3.npy", np.ones((RAMP_SIDE, RAMP_SIDE + 1)))  # wrong shape
    np.save(cdm / "cdm_sim_a.npy", ramp_image(10.0)[None])          # (1, H, W) is accepted
    np.save(cdm / "cdm_sim_b.npy", ramp_image(11.0))
    (cdm / "cdm_sim_c.npy").write_bytes(b"\x93NUMPY garbage, not an array")  # corrupt
    bad = ramp_image(12.0)
    bad[0, 0] = np.nan
    np.save(cdm / "cdm_sim_d.npy", bad)                        # non-finite
    np.save(ax / "axion_sim_1.npy", axion_pair(20.0, 1e-23), allow_pickle=True)
    np.save(ax / "axion_sim_2.npy", axion_pair(21.0, 10 ** -22.5), allow_pickle=True)
    (root / "README.txt").write_text("not a class folder")
    return root


def deeplense_cfg(root: Path, **overrides) -> dict:
    """The validated ``deeplense`` section reading ``root``."""
    return default_section("deeplense", path=str(root), **overrides)


# --------------------------------------------------------------------------- biology photo repositories (8x8 photos)
def write_photo(path: Path, value: int = 0) -> Path:
    """An 8x8 photo of one colour set by ``value``: PNG for a .png name, else JPEG."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    Image.new("RGB", (8, 8), (value % 256, (3 * value) % 256, (7 * value) % 256)).save(path, format=fmt)
    return path


def photo_bytes(value: int = 0) -> bytes:
    """The bytes of an 8x8 JPEG whose red channel is ``value``."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value % 256, 50, 90)).save(buf, format="JPEG")
    return buf.getvalue()


def tar_gz(members: dict[str, bytes]) -> bytes:
    """A .tar.gz archive holding ``members`` (name -> content), in that order."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def vlm4bio_repo(root: Path, collide: bool = False) -> Path:
    """Fish: chunks at datasets/Fish/chunk_*/ (as on the Hub); Butterfly: chunks under images/."""
    fish = root / "datasets" / "Fish"
    (fish / "metadata").mkdir(parents=True)
    pd.DataFrame({
        "fileNameAsDelivered": ["INHS_FISH_001.jpg", "INHS_FISH_002.jpg", "INHS_FISH_003.jpg", "INHS_FISH_004.jpg"],
        "scientificName": ["Notropis  atherinoides", "Lepomis macrochirus", None, "Esox lucius"],
        "ARKID": ["a1", "a2", "a3", "a4"],
    }).to_csv(fish / "metadata" / "metadata_10k.csv", index=False)
    pd.DataFrame({"fileNameAsDelivered": ["INHS_FISH_001.jpg"], "eye": [1]}).to_csv(
        fish / "metadata" / "identification_matrix.csv", index=False)
    write_photo(fish / "chunk_1" / "INHS_FISH_001.jpg", 1)
    write_photo(fish / "chunk_2" / "INHS_FISH_002.jpg", 2)
    write_photo(fish / "chunk_2" / "INHS_FISH_003.jpg", 3)  # its row has no species name
    if collide:
        write_photo(fish / "chunk_1" / "INHS_FISH_002.jpg", 99)  # same name, different image
    bfly = root / "datasets" / "Butterfly"
    (bfly / "metadata").mkdir(parents=True)
    pd.DataFrame({"fileNameAsDelivered": ["CAM016154_d.png", "CAM016155_v.png"],
                  "scientificName": ["Heliconius erato", "Heliconius melpomene"]}).to_csv(
        bfly / "metadata" / "metadata_10k.csv", index=False)
    write_photo(bfly / "images" / "chunk_1" / "CAM016154_d.png", 4)
    write_photo(bfly / "images" / "chunk_2" / "CAM016155_v.png", 5)
    (root / "license-metadata").mkdir()
    (root / "license-metadata" / "fish-licenses.csv").write_text("a,b\n1,2\n")
    (root / "README.md").write_text("# VLM4Bio\n")
    return root


TOL_CATALOG = [
    # split, id, eol_content_id, class, family, genus, species, common
    ("train", "c1", "101", "Aves", "Corvidae", "Corvus", "corax", "common raven"),
    ("train", "c2", "102", "Aves", "Corvidae", "Corvus", "corax", "common raven"),
    ("train", "c3", "103", "Aves", "Corvidae", "Corvus", "corax", "common raven"),
    ("train", "c4", "104", "Aves", "Corvidae", "Corvus", "corax", "common raven"),
    ("train", "c5", "105", "Aves", "Corvidae", "Corvus", "corax", "common raven"),
    ("train", "p1", "201", "Aves", "Corvidae", "Pica", "Pica pica", "magpie"),
    ("train", "p2", "202", "Aves", "Corvidae", "Pica", "Pica pica", "magpie"),
    ("train", "m1", "301", "Aves", "Paridae", "Parus", "major", "great tit"),
    ("train", "m2", "302", "Aves", "Paridae", "Parus", "major", "great tit"),
    ("train", "g1", "401", "Aves", "Corvidae", "Corvus", None, None),  # no species: rejected
    ("train", "i1", None, "Aves", "Corvidae", "Corvus", "corax", "common raven"),  # iNat21 row: not in EOL sets
    ("val", "v1", "501", "Aves", "Corvidae", "Corvus", "corax", "common raven"),
    ("train", "x1", "601", "Mammalia", "Canidae", "Canis", "lupus", "wolf"),
]
TOL_ARCHIVES = {  # image_set number -> member names
    1: ["c1.jpg", "c2.jpg", "images/c3.jpg", "c1.json", "m1.jpg", "x1.jpg", "v1.jpg"],
    2: ["c4.jpg", "c5.jpg", "p1.jpg", "images/p2.jpg", "m2.jpg", "g1.jpg"],
    3: ["m3.jpg"],
}


def treeoflife_repo(root: Path, extra_rows: list[tuple] = ()) -> Path:
    """TreeOfLife-10M's layout: metadata/catalog.csv (TOL_CATALOG plus ``extra_rows``) and the TOL_ARCHIVES."""
    rows = []
    for split, tid, eol, cls, fam, genus, species, common in [*TOL_CATALOG, *extra_rows]:
        rows.append({"split": split, "treeoflife_id": tid, "eol_content_id": eol,
                     "eol_page_id": None if eol is None else f"9{eol}", "bioscan_part": None,
                     "bioscan_filename": None, "inat21_filename": None if eol else f"{tid}.jpg",
                     "inat21_cls_name": None, "inat21_cls_num": None,
                     "kingdom": "Animalia", "phylum": "Chordata", "class": cls, "order": "Passeriformes",
                     "family": fam, "genus": genus, "species": species, "common": common})
    (root / "metadata").mkdir(parents=True)
    pd.DataFrame(rows).to_csv(root / "metadata" / "catalog.csv", index=False)
    (root / "dataset" / "EOL").mkdir(parents=True)
    for n, names in TOL_ARCHIVES.items():
        members = {name: (b"{}" if name.endswith(".json") else photo_bytes(i)) for i, name in enumerate(names)}
        (root / "dataset" / "EOL" / f"image_set_{n:02d}.tar.gz").write_bytes(tar_gz(members))
    return root


def treeoflife_cfg(**overrides) -> dict:
    """The validated ``treeoflife`` section the fixture catalog is read with: the train split's crows, ravens and
    magpies, at most 3 per species, from up to 3 archives."""
    return default_section("treeoflife", **{"taxa": {"class": ["Aves"], "family": ["Corvidae"]}, "split": "train",
                                            "max_per_species": 3, "seed": 0, "max_archives": 3, **overrides})


RARE_COLUMNS = ["rarespecies_id", "eol_content_id", "eol_page_id", "kingdom", "phylum", "class", "order",
                "family", "genus", "species", "sciName", "common", "file_name"]


def rare_species_rows() -> list[dict]:
    """Rare Species metadata rows: three species, two images each; the last row has no species name."""
    taxa = [("Chordata", "Reptilia", "Testudines", "Chelidae", "Acanthochelys", "macrocephala",
             "Pantanal swamp turtle"),
            ("Chordata", "Aves", "Accipitriformes", "Accipitridae", "Haliaeetus", "vociferoides",
             "Madagascar fish eagle"),
            ("Cnidaria", "Anthozoa", "Scleractinia", "Acroporidae", "Acropora", "millepora", "staghorn coral")]
    rows = []
    for t, (phylum, cls, order, fam, genus, sp, common) in enumerate(taxa):
        folder = "-".join(["Animalia", phylum, cls, order, fam, genus, sp])
        for k in range(2):
            content, page = 1000 + 10 * t + k, 500 + t
            rows.append({"rarespecies_id": f"rs-{t}{k}", "eol_content_id": str(content), "eol_page_id": str(page),
                         "kingdom": "Animalia", "phylum": phylum, "class": cls, "order": order, "family": fam,
                         "genus": genus, "species": sp, "sciName": f"{genus} {sp}", "common": common,
                         "file_name": f"dataset/{folder}/{content}_{page}_eol_full-size-copy.jpg"})
    rows[5]["sciName"] = rows[5]["species"] = None  # no species name: rejected
    return rows


def rare_species_repo(root: Path, images_as: str = "files") -> Path:
    """The Rare Species layout; row 3's image is missing; ``images_as`` 'files' or 'parquet' (datasets shards)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = rare_species_rows()
    root.mkdir(parents=True)
    pd.DataFrame(rows, columns=RARE_COLUMNS).to_csv(root / "metadata.csv", index=False)
    (root / "metadata").mkdir()
    pd.DataFrame(rows, columns=RARE_COLUMNS[:-1]).to_csv(root / "metadata" / "rarespecies-catalog.csv", index=False)
    (root / "visuals").mkdir()
    write_photo(root / "visuals" / "phyla_ToL_tree.png")
    with_images = [r for i, r in enumerate(rows) if i != 3]  # row 3's image is missing
    if images_as == "files":
        for i, r in enumerate(with_images):
            write_photo(root / r["file_name"], i)
    else:  # images in parquet shards, as the datasets library stores an imagefolder
        (root / "data").mkdir()
        table = pa.table({
            "file_name": [{"bytes": photo_bytes(i), "path": Path(r["file_name"]).name}
                          for i, r in enumerate(with_images)],
            "rarespecies_id": [r["rarespecies_id"] for r in with_images],
            "sciName": [r["sciName"] for r in with_images],
        })
        pq.write_table(table, root / "data" / "train-00000-of-00001.parquet")
    return root


# --------------------------------------------------------------------------- stage settings and embeddings
# A three-epoch DINO on 32 px images with a tiny head, monitored every second epoch.
PRETRAIN_CFG = default_section(
    "pretrain", epochs=3, batch_size=8, out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16, global_crop_size=32,
    local_crop_size=16, local_crops_number=2, warmup_epochs=1, precision="32-true", num_workers=0,
    monitor={**default_section("pretrain")["monitor"], "every_epochs": 2},
)
FINETUNE_CFG = {"regress_target": "log10_m_axion", "regress_label": "axion", "epochs": 1, "batch_size": 8, "lr": 5e-4,
                "backbone_lr_scale": 0.1, "weight_decay": 0.05, "augment": True, "num_workers": 0, "seed": 0}
# The validated evaluate section (topk [1, 3, 5], fit on train, score test, chunk_size 4096, seed 0), a smaller k-NN
# and linear probe, and a key the protocols must ignore.
EVALUATE_CFG = default_section("evaluate", knn_k=5, linear_max_iter=500, unrelated_key="ignored")


def write_embeddings(path, emb, labels, splits, classes=CLASSES, method="dino", extra=True, column="embedding"):
    emb = np.asarray(emb, dtype=np.float32)
    n, d = emb.shape
    label_names = [classes[i] for i in labels]
    cols = {
        "id": pa.array([f"img{i:05d}" for i in range(n)]),
        "split": pa.array(list(splits)),
        "label": pa.array(label_names),
        "label_id": pa.array(np.asarray(labels, dtype=np.int64)),
    }
    if extra:
        cols["log10_m_axion"] = pa.array(np.linspace(-24, -22, n))
    cols[column] = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), d)
    table = pa.table(cols)
    table = table.replace_schema_metadata(
        {
            b"method": method.encode(),
            b"model": b"vit_tiny",
            b"checkpoint_sha256": b"ab" * 32,
            b"image_size": b"64",
            b"embed_dim": str(d).encode(),
        }
    )
    pq.write_table(table, path)
    return path


def blobs(rng, n_per_class, n_classes, dim, spread):
    """Gaussian clusters around fixed unit directions (the same for every call with this shape)."""
    from ssl4sci.knn import l2_normalize

    centers = l2_normalize(np.random.default_rng(1234 + dim).normal(size=(n_classes, dim)))
    y = np.repeat(np.arange(n_classes), n_per_class)
    x = centers[y] + spread * rng.normal(size=(len(y), dim))
    return x.astype(np.float32), y


# --------------------------------------------------------------------------- pretraining: guard, batch, checkpoint
GUARD_CFG = default_section("pretrain")["guard"]


# One collated batch of multi-crop views of the first ``n`` train images (the ssl.momentum and ssl.dino tests).
def _batch(data, n=8, seed=0):
    import torch

    from ssl4sci.data import ImageDataset
    from ssl4sci.ssl.augment import MultiCrop

    torch.manual_seed(seed)
    crop = MultiCrop(PRETRAIN_CFG, data.stats["mean"], data.stats["std"], "lensing")
    ds = ImageDataset(data, data.rows(["train"]), transform=crop, raw=True)
    return torch.utils.data.default_collate([ds[i] for i in range(n)])


# A two-epoch DINO run on ``prepared``, shared by the pretrain, embed, attention and finetune tests: session scope
# keeps it one pretraining for all of them.
@pytest.fixture(scope="session")
def checkpoint(prepared, tmp_path_factory):
    from ssl4sci.pretrain import pretrain

    out = tmp_path_factory.mktemp("pretrain")
    return pretrain(prepared, out, "dino", dict(PRETRAIN_CFG, epochs=2), MODEL_CFG, device="cpu", threads=2,
                    progress=False)


# --------------------------------------------------------------------------- content-aware crops
SIZE, SQUARE = 64, 24  # a bright SQUARE x SQUARE block in the top-left corner of a SIZE x SIZE noisy sky


def corner_image(channels: int = 1, seed: int = 0) -> torch.Tensor:
    import torch

    g = torch.Generator().manual_seed(seed)
    img = 0.05 * torch.randn(channels, SIZE, SIZE, generator=g)
    img[:, :SQUARE, :SQUARE] += 1.0
    return img


def make_crop(size: int, scale, **settings) -> ContentAwareResizedCrop:
    """A content-aware crop with the default ``pretrain.augment`` thresholds, placed anywhere and resized (a plain
    RandomResizedCrop's geometry) unless ``settings`` say otherwise."""
    from ssl4sci.ssl.crops import ContentAwareResizedCrop

    augment = default_section("pretrain")["augment"]
    plain = {"min_signal_fraction": augment["min_signal_fraction"], "max_tries": augment["max_tries"],
             "sigma": augment["signal_sigma"], "keep_centre": False, "zoom": True}
    return ContentAwareResizedCrop(size, scale, **{**plain, **settings})


# --------------------------------------------------------------------------- fetched raw layouts, a local HTTP server
def _read(out: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    meta = pd.read_parquet(out / "metadata.parquet")
    rejects = pd.read_parquet(out / "rejects.parquet")
    prov = json.loads((out / "provenance.json").read_text())
    return meta, rejects, prov


class _Server:
    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.ignore_range = False
        self.cut_after: dict[str, int] = {}  # path -> bytes sent before dropping the connection (once)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server API
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                data = server.files.get(self.path)
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = 0
                if rng and not server.ignore_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cut = server.cut_after.pop(self.path, None)
                if cut is not None:  # promise the whole body, send part of it, hang up
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(no_proxy):
    srv = _Server()
    yield srv
    srv.close()


# --------------------------------------------------------------------------- few-shot settings, ranks
# The evaluate settings of the biology protocols: the test split is the pool, small shots and folds.
BIO = {**EVALUATE_CFG, "pool_splits": ["test"], "min_count": 2, "proto_split_fraction": 0.5, "shots": [1, 5],
       "nfold": 3}


def write_table(path, emb, columns: dict, method="dino"):
    """An embeddings file with arbitrary manifest columns (e.g. taxonomic ranks with nulls)."""
    emb = np.asarray(emb, dtype=np.float32)
    n, d = emb.shape
    cols = {"id": pa.array([f"img{i:05d}" for i in range(n)]), "split": pa.array(["test"] * n)}
    cols.update({k: pa.array(list(v)) for k, v in columns.items()})
    cols["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), d)
    table = pa.table(cols).replace_schema_metadata({b"method": method.encode(), b"model": b"vit_tiny"})
    pq.write_table(table, path)
    return path


def taxonomy_file(tmp_path, n_genera=4, species_per_genus=5, per_genus=60, seed=13):
    """Genera are separable clusters; species are random labels inside a genus."""
    rng = np.random.default_rng(seed)
    x, g = blobs(rng, per_genus, n_genera, 16, spread=0.05)
    sp = rng.integers(0, species_per_genus, len(g))
    genus = np.array([f"Genus{i}" for i in g], dtype=object)
    species = np.array([f"Genus{i} sp{j}" for i, j in zip(g, sp)], dtype=object)
    family = np.where(g < 2, "FamA", "FamB").astype(object)
    genus[[0, 70, 130]] = None  # null rank
    genus[[5, 140]] = ""  # empty counts as null
    cols = {"label": list(species), "species": list(species), "genus": list(genus), "family": list(family)}
    return write_table(tmp_path / "tax.parquet", x, cols), g


# --------------------------------------------------------------------------- label efficiency: a pool, the study on it
FRACTIONS = (1, 10, 100)
CLASSIFY_KEYS = {"macro_auc", "macro_auc_std", "accuracy", "accuracy_std"}


def le_cfg(**finetune):
    """The schema's label_efficiency section with a fine-tuning budget a test can afford."""
    cfg = default_section("label_efficiency")
    cfg["finetune"] = {**cfg["finetune"], "steps": 2, "batch_size": 4, "warmup_steps": 1, **finetune}
    return cfg


# Session scope: the prepared pool and the study on it are shared by the label-efficiency and report tests.
@pytest.fixture(scope="session")
def pool_data(tmp_path_factory):
    """A prepared set whose manifest also holds an unlabelled pool (split 'unlabelled', label_id -1)."""
    from ssl4sci.prepare import prepare

    root = tmp_path_factory.mktemp("le_data")
    raw = make_raw(root / "raw", n_per_class=14)
    truth = pd.read_parquet(raw / "truth.parquet")
    truth["unlabelled"] = truth["index"] % 7 == 3  # two images per class go to the pool
    truth.to_parquet(raw / "truth.parquet")
    prepare(raw, root / "data", dict(PREPARE_CFG), source="test")
    manifest = pd.read_parquet(root / "data" / "manifest.parquet")
    pool = manifest[manifest["split"] == "unlabelled"]
    assert len(pool) == 6 and (pool["label_id"] == -1).all()
    return root / "data"


@pytest.fixture(scope="session")
def study(pool_data, tmp_path_factory):
    """The whole stage for the untrained baseline (fine-tuning it = supervised from scratch) on the tiny ViT."""
    import torch

    from ssl4sci.embed import embed
    from ssl4sci.label_efficiency import label_efficiency

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("le_run")
    emb = embed(pool_data, root / "random_init.parquet", "random_init", None, {"batch_size": 16, "seed": 0}, MODEL_CFG,
                device="cpu")
    out = root / "label_efficiency" / "random_init"
    result = label_efficiency(pool_data, emb, out, "random_init", None, le_cfg(), MODEL_CFG,
                              regress_target="log10_m_axion", regress_label="axion", domain="lensing", device="cpu")
    return out, result


# --------------------------------------------------------------------------- region loss and autograd memory
def region_loss_before(student_logits, student_feats, teacher_logits, teacher_feats, center, teacher_temp: float,
                       student_temp: float) -> "torch.Tensor":
    """The region loss as computed before it was cut into checkpointed pieces: every view's (B, N, K)
    log-probabilities at once, the targets in full, one pair after another."""
    import torch
    import torch.nn.functional as F

    from ssl4sci.ssl.losses import match_tokens

    targets = [F.softmax((t - center) / teacher_temp, dim=-1) for t in teacher_logits]
    log_probs = [F.log_softmax(s / student_temp, dim=-1) for s in student_logits]
    total, pairs = 0.0, 0
    for iq, (q, t_feats) in enumerate(zip(targets, teacher_feats)):
        for iv, (logp, s_feats) in enumerate(zip(log_probs, student_feats)):
            if iv != iq:
                index = match_tokens(s_feats, t_feats)
                total = total - torch.bmm(logp, q.transpose(1, 2)).gather(2, index.unsqueeze(-1)).mean()
                pairs += 1
    return total / pairs


def saved_bytes(compute, existing: tuple = ()) -> tuple[object, int]:
    """compute()'s result and the bytes of the tensors autograd saved for backward while it ran, each storage once,
    those of ``existing`` tensors (alive anyway) left out."""
    import torch

    storages = {}
    skip = {t.untyped_storage().data_ptr() for t in existing}

    def keep(t):
        if t.untyped_storage().data_ptr() not in skip:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        result = compute()
    return result, sum(storages.values())
