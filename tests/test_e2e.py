"""The Snakemake DAG end to end on a micro config: outputs, re-run behaviour, lint, bad config."""
from __future__ import annotations

import base64
import json
import re

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import MICRO, REPO, planned_jobs, run_snakemake, write_deeplense_folder

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("e2e")
    configfile = workdir / "micro.yaml"
    configfile.write_text(yaml.safe_dump(MICRO))
    run_snakemake(workdir, configfile)
    return workdir, configfile, workdir / "results" / "micro"


def test_every_output_is_there_and_sane(run):
    _, _, res = run
    everything = pd.read_parquet(res / "data" / "manifest.parquet")
    assert len(everything) + len(pd.read_parquet(res / "data" / "rejects.parquet")) == 36
    assert set(everything["split"]) == {"train", "val", "test", "unlabelled"}
    pool = everything[everything["split"] == "unlabelled"]
    manifest = everything[everything["split"] != "unlabelled"]
    # the unlabelled pool: in the manifest (6 rows, no labels), read by pretraining only
    assert len(pool) == 6 and (pool["label"] == "").all() and (pool["label_id"] == -1).all()
    ckpt = torch.load(res / "pretrain" / "dino" / "last.ckpt", map_location="cpu", weights_only=False)["ssl4sci"]
    assert (ckpt["n_train"], ckpt["n_unlabelled"]) == ((manifest["split"] == "train").sum(), 6)
    for method in ("dino", "esvit", "random_init", "random_init_esvit"):
        table = pq.read_table(res / "embeddings" / f"{method}.parquet")
        assert sorted(table.column("id").to_pylist()) == sorted(manifest["id"])  # no pool image is embedded
        meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
        dim = int(meta["embed_dim"])
        assert table.schema.field("embedding").type.list_size == dim
        emb = table.column("embedding").combine_chunks().flatten().to_numpy()
        assert emb.size == dim * len(manifest) and np.isfinite(emb).all()
        for protocol in ("prototype", "knn", "linear"):
            metrics = json.loads((res / "eval" / method / f"{protocol}.json").read_text())["metrics"]
            assert all(0.0 <= v <= 1.0 for v in metrics.values() if isinstance(v, float))
        if method == "random_init_esvit":  # embedded and evaluated, not fine-tuned in this config
            continue
        cls_json = json.loads((res / "finetune" / method / "classify" / "metrics.json").read_text())
        assert cls_json["n_train"] + cls_json["n_val"] + cls_json["n_test"] == len(manifest)  # no pool image either
        cls = cls_json["metrics"]
        assert 0.0 <= cls["macro_auc"] <= 1.0 and all(0.0 <= a <= 1.0 for a in cls["auc_per_class"].values())
        reg = json.loads((res / "finetune" / method / "regress" / "metrics.json").read_text())["metrics"]
        assert np.isfinite(reg["mae"])
    summary = json.loads((res / "summary.json").read_text())
    assert set(summary) >= {"dino", "esvit", "random_init", "random_init_esvit"} and "top1" in summary["dino"]["knn"]
    history = pd.read_csv(res / "pretrain" / "esvit" / "metrics.csv")
    assert {"view_loss", "region_loss", "teacher_kl", "crop_reject_rate", "knn_val"} <= set(history.columns)
    assert 0.0 <= history["knn_val"].iloc[-1] <= 1.0  # the monitor scored the last epoch
    html = (res / "report.html").read_text()
    assert "Δ esvit vs random_init_esvit" in html and "Self-supervised vs untrained weights" in html
    figures = [res / "data" / "samples.png", res / "pretrain" / "dino" / "loss.png"]
    figures += [res / "finetune" / m / t / f for m in ("dino", "random_init")
                for t, f in (("classify", "roc.png"), ("regress", "scatter.png"))]
    figures += [res / "attention" / m / "gallery.png" for m in ("dino", "random_init")]
    for fig in figures:
        assert base64.b64encode(fig.read_bytes()).decode() in html, f"{fig} is not embedded in the report"
    # self-contained: nothing is loaded from elsewhere (URLs may appear as text, e.g. in the config dump)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html) and "<script src" not in html
    assert (res / "summary.md").read_text().count("\n| ") >= 2
    # dimensional collapse: the rank per monitored epoch and before training, the spectrum protocol, the target line
    history = pd.read_csv(res / "pretrain" / "dino" / "metrics.csv")
    assert history["effective_rank"].notna().iloc[-1] and history["effective_rank_init"].notna().all()
    spectrum = json.loads((res / "eval" / "random_init" / "spectrum.json").read_text())["metrics"]
    assert 1.0 < spectrum["effective_rank"] <= spectrum["embed_dim"]
    assert "dino: effective rank " in html and "for random_init (ratio " in html
    for stage in ("fetch", "prepare", "pretrain_dino", "report"):
        assert (res / "benchmarks" / f"{stage}.tsv").exists() and (res / "logs" / f"{stage}.log").exists()


def test_second_run_has_nothing_to_do(run):
    workdir, configfile, _ = run
    assert planned_jobs(run_snakemake(workdir, configfile, "--dry-run")) == {}


def test_label_efficiency_for_every_method_and_its_own_baseline(run):
    _, _, res = run
    everything = pd.read_parquet(res / "data" / "manifest.parquet")
    train_ids = set(everything.loc[everything["split"] == "train", "id"])
    summary = json.loads((res / "summary.json").read_text())
    for method in ("dino", "random_init", "esvit", "random_init_esvit"):
        metrics = json.loads((res / "label_efficiency" / method / "metrics.json").read_text())
        kinds = ("linear", "finetune", "regress")
        assert list(metrics["protocols"]) == [f"{k}@{f}" for k in kinds for f in (1, 10, 100)]
        for protocol, entry in metrics["protocols"].items():
            assert all(np.isfinite(v) for v in entry["metrics"].values())
            assert summary[method][protocol] == entry["metrics"]
        subsets = pd.read_parquet(res / "label_efficiency" / method / "subsets.parquet")
        assert set(subsets["id"]) <= train_ids  # never val, test or the unlabelled pool
        assert (res / "benchmarks" / f"label_efficiency_{method}.tsv").exists()
    html = (res / "report.html").read_text()
    assert "<h2>Label efficiency</h2>" in html and "At 10 % labels, fine-tuning from the best SSL method" in html


def test_label_efficiency_change_reruns_that_stage_and_the_report_only(run):
    workdir, _, _ = run
    changed = json.loads(json.dumps(MICRO))
    changed["label_efficiency"]["finetune"]["steps"] = 3
    other = workdir / "le_changed.yaml"
    other.write_text(yaml.safe_dump(changed))
    assert planned_jobs(run_snakemake(workdir, other, "--dry-run")) == {"label_efficiency": 4, "report": 1}


def test_pretrain_change_reruns_pretrain_and_downstream_only(run):
    workdir, configfile, res = run
    changed = json.loads(json.dumps(MICRO))
    changed["pretrain"]["esvit"]["region_weight"] = 0.3  # EsViT's own setting: DINO and the baselines stay
    other = workdir / "changed.yaml"
    other.write_text(yaml.safe_dump(changed))
    jobs = planned_jobs(run_snakemake(workdir, other, "--dry-run"))
    assert jobs == {"pretrain": 1, "embed": 1, "evaluate": 4, "finetune_classify": 1, "finetune_regress": 1,
                    "label_efficiency": 1, "report": 1}
    data_mtime = (res / "data" / "manifest.parquet").stat().st_mtime
    ckpt_mtime = (res / "pretrain" / "esvit" / "last.ckpt").stat().st_mtime
    kept = [res / "pretrain" / "dino" / "last.ckpt", res / "embeddings" / "random_init.parquet",
            res / "embeddings" / "random_init_esvit.parquet"]
    kept_mtimes = [p.stat().st_mtime for p in kept]
    run_snakemake(workdir, other)
    assert (res / "data" / "manifest.parquet").stat().st_mtime == data_mtime
    assert [p.stat().st_mtime for p in kept] == kept_mtimes
    assert (res / "pretrain" / "esvit" / "last.ckpt").stat().st_mtime > ckpt_mtime
    assert planned_jobs(run_snakemake(workdir, other, "--dry-run")) == {}
    # a setting both methods share re-runs both pretrainings
    changed["pretrain"]["base_lr"] = 0.001
    other.write_text(yaml.safe_dump(changed))
    assert planned_jobs(run_snakemake(workdir, other, "--dry-run"))["pretrain"] == 2


def test_lint_is_clean(tmp_path):
    proc = run_snakemake(tmp_path, REPO / "config" / "config.yaml", "--lint", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Lints for" not in proc.stdout + proc.stderr


def test_bad_config_fails_before_any_job_naming_the_key(tmp_path):
    bad = json.loads(json.dumps(MICRO))
    bad["pretrain"]["epochs"] = 0
    configfile = tmp_path / "bad.yaml"
    configfile.write_text(yaml.safe_dump(bad))
    proc = run_snakemake(tmp_path, configfile, check=False)
    assert proc.returncode != 0
    assert "config key 'pretrain.epochs': expected >= 1, got 0" in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()


def test_deeplense_source_feeds_prepare_through_the_dag(tmp_path):
    """source: deeplense -> fetch and prepare run as Snakemake jobs on a published-layout folder."""
    rng = np.random.default_rng(0)
    # the older release names
    folder = write_deeplense_folder(tmp_path / "model_i", {n: [rng.random((40, 40)) for _ in range(6)]
                                                          for n in ("no", "sphere", "vort")}, rng)
    (folder / "vort" / "vort_sim_broken.npy").write_bytes(b"not an array")
    config = {"experiment": "dl", "source": "deeplense", "deeplense": {"path": str(folder)},
              "prepare": {"image_size": 32, "split": {"train": 0.5, "val": 0.0, "test": 0.5}},
              "model": {"patch_size": 8},
              "pretrain": {"global_crop_size": 32, "local_crop_size": 16}}
    configfile = tmp_path / "dl.yaml"
    configfile.write_text(yaml.safe_dump(config))
    run_snakemake(tmp_path, configfile, "results/dl/data/manifest.parquet")
    manifest = pd.read_parquet(tmp_path / "results" / "dl" / "data" / "manifest.parquet")
    assert sorted(manifest["label"].unique()) == ["axion", "cdm", "no_sub"] and len(manifest) == 18
    assert manifest.loc[manifest["label"] == "axion", "log10_m_axion"].between(-24, -22).all()
    rejects = pd.read_parquet(tmp_path / "results" / "dl" / "data" / "rejects.parquet")
    assert len(rejects) == 1 and rejects["path"].iloc[0].endswith("vort_sim_broken.npy")
    assert not (tmp_path / "results" / "dl" / "raw" / "arc_masks.npy").exists()


def test_cnn_backbone_through_pretrain_embed_evaluate_label_efficiency_and_finetune(tmp_path):
    """DINO on a timm CNN: every stage that takes a backbone, and a report that says attention does not apply."""
    config = json.loads(json.dumps(MICRO))
    config["experiment"] = "cnn"
    config["model"] = {"name": "test_resnet", "drop_path_rate": 0.0}  # timm's tiny ResNet: seconds per job
    config["pretrain"]["methods"] = ["dino"]
    config["pretrain"].pop("esvit")
    config["finetune"]["methods"] = ["dino", "random_init"]
    config["attention"]["methods"] = []
    configfile = tmp_path / "cnn.yaml"
    configfile.write_text(yaml.safe_dump(config))
    run_snakemake(tmp_path, configfile)
    res = tmp_path / "results" / "cnn"
    ckpt = torch.load(res / "pretrain" / "dino" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["ssl4sci"]["model"]["name"] == "test_resnet" and any(".bn" in k for k in ckpt["teacher_backbone"])
    for method in ("dino", "random_init"):
        schema = pq.read_schema(res / "embeddings" / f"{method}.parquet")
        meta = {k.decode(): v.decode() for k, v in schema.metadata.items()}
        assert meta["model"] == "test_resnet" and meta["feature"].startswith("average-pooled")
    summary = json.loads((res / "summary.json").read_text())
    for method in ("dino", "random_init"):
        assert 0.0 <= summary[method]["knn"]["top1"] <= 1.0 and summary[method]["spectrum"]["effective_rank"] > 0
        assert np.isfinite(summary[method]["finetune@10"]["macro_auc"])
        assert np.isfinite(summary[method]["regress@100"]["mae"])
        assert 0.0 <= summary[method]["finetune_classify"]["accuracy"] <= 1.0
    assert not (res / "attention").exists()
    html = (res / "report.html").read_text()
    assert "Does not apply to dino (test_resnet), random_init (test_resnet)" in html
