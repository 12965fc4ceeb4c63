"""The biology DAG end to end on a local image folder: photo prepare, per-rank few-shot and k-NN tables."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import MICRO, run_snakemake
from PIL import Image

pytestmark = pytest.mark.e2e

# Two families, two genera each, two species per genus: colour tells the family, a stripe the genus.
TAXA = [
    ("Fam_a", "Gen_a", "Gen_a alpha"), ("Fam_a", "Gen_a", "Gen_a beta"),
    ("Fam_a", "Gen_b", "Gen_b gamma"), ("Fam_a", "Gen_b", "Gen_b delta"),
    ("Fam_c", "Gen_c", "Gen_c eps"), ("Fam_c", "Gen_c", "Gen_c zeta"),
    ("Fam_c", "Gen_d", "Gen_d eta"), ("Fam_c", "Gen_d", "Gen_d theta"),
]


def make_photos(root):
    rng = np.random.default_rng(0)
    rows = []
    for family, genus, species in TAXA:
        for i in range(8):
            img = rng.integers(0, 40, size=(48, 40, 3), dtype=np.uint8)
            img[..., 0 if family == "Fam_a" else 2] += 180
            if genus in ("Gen_b", "Gen_d"):
                img[20:28] = 255
            name = f"{species.replace(' ', '_')}_{i}.jpg"
            Image.fromarray(img).save(root / name)
            rows.append({"path": name, "label": species, "family": family, "genus": genus, "species": species})
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    rows.append({"path": "broken.jpg", "label": "Gen_a alpha", "family": "Fam_a", "genus": "Gen_a",
                 "species": "Gen_a alpha"})
    pd.DataFrame(rows).to_csv(root / "photos.csv", index=False)
    return root / "photos.csv"


def test_bio_dag_on_a_local_folder_reports_per_rank_tables(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    config = json.loads(json.dumps(MICRO))
    config.update(experiment="bio", source="image_folder", image_folder={"csv": str(make_photos(photos))})
    config["prepare"] = {"image_size": 32, "resize_shorter": 32, "split": {"train": 0.5, "val": 0.0, "test": 0.5},
                         "samples_per_class": 2}
    config["evaluate"] = {"protocols": ["prototype_seed", "simpleshot", "knn", "linear"], "ranks": ["genus", "family"],
                          "pool_splits": ["train", "test"], "shots": [1, 5], "nfold": 3}
    config["finetune"] = {"tasks": ["classify"], "epochs": 1, "batch_size": 8}
    # no val split here, so one C for the probe (a grid is chosen on val); photos have no regression target
    config["label_efficiency"] = {**config["label_efficiency"], "linear": {"Cs": [1.0]}}
    configfile = tmp_path / "bio.yaml"
    configfile.write_text(yaml.safe_dump(config))
    run_snakemake(tmp_path, configfile)

    res = tmp_path / "results" / "bio"
    manifest = pd.read_parquet(res / "data" / "manifest.parquet")
    assert len(manifest) == 64 and manifest["label"].nunique() == 8
    assert {"genus", "family"} <= set(manifest.columns)
    rejects = pd.read_parquet(res / "data" / "rejects.parquet")
    assert list(rejects["path"].str.endswith("broken.jpg")) == [True]

    summary = json.loads((res / "summary.json").read_text())
    for method in ("dino", "random_init"):
        for group in ("simpleshot", "prototype_seed", "knn", "simpleshot@genus", "knn@family", "prototype_seed@family"):
            assert group in summary[method], (method, group, sorted(summary[method]))
        assert 0 <= summary[method]["simpleshot"]["shot1_mean"] <= 1
    # colour separates the families, so even untrained features find the family by k-NN
    assert summary["random_init"]["knn@family"]["top1"] >= 0.9
    html = (res / "report.html").read_text()
    assert "Per taxonomic rank" in html and "knn@genus" in html
    assert "finetune@10" in summary["dino"] and "regress@10" not in summary["dino"]  # label efficiency, no regression
