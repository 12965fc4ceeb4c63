"""Label-efficiency stage: how a method's test quality grows with the number of labels it is given.

For every fraction f of the labelled train split (percent: 1, 10, 100 by default) and every seed, one subset is
drawn per class: the first max(1, round(f/100 * n_class)) images of one seeded permutation of the class's train
images. Subsets are therefore stratified and, for one seed, nested (1 % ⊂ 10 % ⊂ 100 %): a larger fraction only
adds labels. On each subset:

* ``linear@f``: logistic regression on the method's frozen embeddings (the embed stage's file), C chosen on val;
* ``finetune@f``: the backbone (the trained teacher, or a baseline's untrained weights: supervised from scratch)
  with a linear head, trained end to end for a fixed number of steps;
* ``regress@f``: the same fine-tuning on a continuous truth (``finetune.regress_target`` on the images of class
  ``finetune.regress_label``), MAE in the target's units next to the MAE of predicting the subset's mean.

Everything is scored on the test split. Only train/val/test rows with a label are read: the unlabelled
pretraining pool never reaches this stage. Writes ``subsets.parquet`` (id, task, seed, fraction: the ids every fit
trained on) and ``metrics.json`` (per protocol: per-seed values, mean and std over seeds, n_train).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from threadpoolctl import threadpool_limits

from ssl4sci.data import LABELLED_SPLITS, ImageDataset, PreparedData
from ssl4sci.io import write_json, write_parquet
from ssl4sci.labels import some_names
from ssl4sci.models import load_backbone, pick_device
from ssl4sci.probes import fit_logistic_probe, load_embeddings
from ssl4sci.registry.protocols import LABEL_EFFICIENCY_PROTOCOLS
from ssl4sci.runtime import setup_process
from ssl4sci.supervised import (
    BackboneWithHead,
    TargetDataset,
    classification_metrics,
    label_preserving_augment,
    predict,
    regression_metrics,
    train_steps,
)

PROTOCOLS = LABEL_EFFICIENCY_PROTOCOLS
CLASSIFY_METRICS = ("macro_auc", "accuracy")
REGRESS_METRICS = ("mae", "mae_predict_train_mean")


def protocol_name(kind: str, fraction: float) -> str:
    """``linear@10``, ``finetune@1``, ``regress@2.5``: the protocol's key in metrics.json and summary.json."""
    return f"{kind}@{fraction:g}"


def labelled_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The train/val/test rows that carry a label: the unlabelled pool (and any label-less row) is dropped."""
    return rows[rows["split"].isin(LABELLED_SPLITS).to_numpy() & (rows["label_id"].to_numpy() >= 0)]


def nested_subsets(ids: np.ndarray, groups: np.ndarray, fractions: list[float], seeds: list[int],
                   min_per_group: int) -> pd.DataFrame:
    """Stratified, seeded, nested subsets: columns id, seed, fraction (percent).

    Per seed and group, one permutation of the group's ids; the subset at fraction f takes its first
    min(n, max(min_per_group, round(f/100 * n))) ids. Ids are sorted first, so the draw does not depend on row order.
    """
    order = np.argsort(ids, kind="stable")
    ids, groups = np.asarray(ids)[order], np.asarray(groups)[order]
    parts = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        for group in sorted(set(groups.tolist())):
            members = ids[groups == group]
            permuted = members[rng.permutation(len(members))]
            for fraction in fractions:
                k = min(len(permuted), max(min_per_group, int(np.floor(fraction / 100 * len(permuted) + 0.5))))
                parts.append(pd.DataFrame({"id": permuted[:k], "seed": seed, "fraction": float(fraction)}))
    return pd.concat(parts, ignore_index=True)


def draw_subsets(rows: pd.DataFrame, cfg: dict[str, Any], regress_target: str, regress_label: str,
                 manifest: Path) -> pd.DataFrame:
    """The subsets of every task (columns id, task, seed, fraction): ``classify`` stratified by class over the train
    rows; ``regress`` over the train rows of ``regress_label`` with a finite target (at least 2 per subset)."""
    seeds = [cfg["seed"] + i for i in range(cfg["seeds"])]
    fractions = [float(f) for f in cfg["fractions"]]
    train = rows[rows["split"] == "train"]
    if train.empty:
        raise ValueError(f"{manifest}: no labelled train images; the label-efficiency study needs them")
    tables = []
    if {"linear", "finetune"} & set(cfg["protocols"]):
        found = sorted(set(train["label"]))
        if len(found) < 2:  # one class: every prediction is right, and the AUC is undefined
            raise ValueError(f"{manifest}: label_efficiency.protocols 'linear' and 'finetune' expect train images of "
                             f"at least 2 classes, found {len(found)} ({', '.join(map(repr, found))})")
        table = nested_subsets(train["id"].to_numpy(), train["label"].to_numpy(), fractions, seeds, min_per_group=1)
        tables.append(table.assign(task="classify"))
    if "regress" in cfg["protocols"]:
        pool = regression_rows(train, regress_target, regress_label, manifest)
        table = nested_subsets(pool["id"].to_numpy(), np.zeros(len(pool)), fractions, seeds, min_per_group=2)
        tables.append(table.assign(task="regress"))
    return pd.concat(tables, ignore_index=True)[["id", "task", "seed", "fraction"]]


def regression_rows(rows: pd.DataFrame, target: str, label: str, manifest: Path, at_least: int = 2) -> pd.DataFrame:
    """Rows of class ``label`` whose ``target`` is finite (at least ``at_least`` of them)."""
    if target not in rows.columns:
        raise ValueError(f"config key 'finetune.regress_target': column '{target}' is not in {manifest} "
                         "(a data set without it needs label_efficiency.protocols without 'regress')")
    chosen = rows[(rows["label"] == label).to_numpy() & np.isfinite(rows[target].to_numpy(dtype=np.float64))]
    if len(chosen) < at_least:
        splits = "/".join(sorted(set(rows["split"])))
        raise ValueError(f"config key 'finetune.regress_label': expected at least {at_least} {splits} images of "
                         f"class '{label}' with a finite '{target}' in {manifest}, found {len(chosen)}")
    return chosen


def class_warnings(rows: pd.DataFrame, classes: list[str]) -> list[str]:
    """Classes the test metrics cannot judge fairly: none in train (only chance is possible for them), none in test
    (macro_auc and accuracy average the other classes), a test split of one class (macro_auc undefined: NaN)."""
    found = []
    effects = (("train", "cannot be learned, their AUC is chance"), ("test", "macro_auc averages the others"))
    for split, effect in effects:
        present = set(rows.loc[rows["split"] == split, "label"])
        missing = [c for c in classes if c not in present]
        if missing:
            found.append(f"{len(missing)} class(es) have no {split} images, {effect}: {some_names(missing)}")
    if rows.loc[rows["split"] == "test", "label"].nunique() == 1:
        found.append("the test images are of one class: macro_auc is undefined (NaN)")
    return found


def _summarise(runs: list[dict[str, Any]], metrics: tuple[str, ...], fraction: float) -> dict[str, Any]:
    """Mean and std over seeds (sample std; 0 with one seed) of each metric, with the per-seed runs."""
    summary: dict[str, float] = {}
    for name in metrics:
        values = np.array([r[name] for r in runs], dtype=np.float64)
        summary[name] = float(values.mean())
        summary[f"{name}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return {"fraction": fraction, "n_train": int(runs[0]["n_train"]), "metrics": summary, "runs": runs}


def _runs_by_fraction(subsets: pd.DataFrame, task: str):
    """(fraction, seed, ids) of every fit of a task, in fraction then seed order."""
    part = subsets[subsets["task"] == task]
    for (fraction, seed), group in part.groupby(["fraction", "seed"], sort=True):
        yield float(fraction), int(seed), group["id"].to_numpy()


def linear_study(embeddings_path: str | Path, subsets: pd.DataFrame, classes: list[str],
                 cfg: dict[str, Any]) -> dict[str, Any]:
    """``linear@f`` for every fraction: a logistic probe per seed on the subset's frozen embeddings."""
    path = Path(embeddings_path)
    df, emb, _ = load_embeddings(path)
    keep = (df["split"].isin(LABELLED_SPLITS) & (df["label_id"] >= 0)).to_numpy()
    df, emb = df[keep].reset_index(drop=True), emb[keep]
    if not np.isfinite(emb).all():
        raise ValueError(f"{path}: expected finite embeddings, found NaN or inf")
    position = pd.Series(np.arange(len(df)), index=df["id"].to_numpy())
    labels = df["label_id"].to_numpy()
    val, test = (df["split"] == "val").to_numpy(), (df["split"] == "test").to_numpy()
    if not test.any():
        raise ValueError(f"{path}: no test rows to score the linear probe on")
    if len(cfg["linear"]["Cs"]) > 1 and not val.any():
        raise ValueError(f"config key 'label_efficiency.linear.Cs': choosing C needs val rows, {path} has none "
                         "(give a single C or a val split)")
    runs: dict[float, list[dict[str, Any]]] = {}
    for fraction, seed, ids in _runs_by_fraction(subsets, "classify"):
        missing = sorted(set(ids) - set(position.index))
        if missing:
            raise ValueError(f"{path}: {len(missing)} train images of the subset are not embedded (e.g. {missing[0]})")
        rows = position.loc[ids].to_numpy()
        probe, info = fit_logistic_probe(emb[rows], labels[rows], emb[val], labels[val], len(classes),
                                         cfg["linear"]["Cs"], cfg["linear"]["max_iter"], seed)
        metrics, _ = classification_metrics(probe.probabilities(emb[test]), labels[test], classes)
        runs.setdefault(fraction, []).append({"seed": seed, "n_train": len(rows), "macro_auc": metrics["macro_auc"],
                                              "accuracy": metrics["accuracy"], **info})
    return {protocol_name("linear", f): _summarise(r, CLASSIFY_METRICS, f) for f, r in runs.items()}


def finetune_study(data: PreparedData, rows: pd.DataFrame, subsets: pd.DataFrame, task: str, backbone: torch.nn.Module,
                   cfg: dict[str, Any], domain: str, device: torch.device, regress: dict[str, str]) -> dict[str, Any]:
    """``finetune@f`` (task classify) or ``regress@f`` (task regress): per seed, the backbone from its initial
    weights plus a fresh linear head, trained end to end on the subset and scored on the test split."""
    ft = cfg["finetune"]
    initial = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    by_id = rows.set_index("id")
    test = rows[rows["split"] == "test"]
    if task == "regress":
        test = regression_rows(test, regress["target"], regress["label"], data.dir / "manifest.parquet", at_least=1)
    if test.empty:
        raise ValueError(f"{data.dir / 'manifest.parquet'}: no test images to score {task} on")
    column = "label_id" if task == "classify" else regress["target"]
    test_set = TargetDataset(ImageDataset(data, test), test[column].to_numpy(), task)
    augment = label_preserving_augment(domain) if ft["augment"] else None
    runs: dict[float, list[dict[str, Any]]] = {}
    for fraction, seed, ids in _runs_by_fraction(subsets, task):
        train = by_id.loc[ids].reset_index()
        target = train[column].to_numpy(dtype=np.float64)
        mu, sigma = (0.0, 1.0) if task == "classify" else (float(target.mean()), float(target.std() or 1.0))
        backbone.load_state_dict(initial)
        torch.manual_seed(seed)  # the head's initial weights
        model = BackboneWithHead(backbone, len(data.classes) if task == "classify" else 1)
        train_set = TargetDataset(ImageDataset(data, train, transform=augment), (target - mu) / sigma, task)
        losses = train_steps(model, train_set, task, ft, device, seed)
        out, truth = predict(model, test_set, ft["eval_batch_size"], device, ft["num_workers"])
        run: dict[str, Any] = {"seed": seed, "n_train": len(train), "final_train_loss": losses[-1]}
        if task == "classify":
            metrics, _ = classification_metrics(torch.softmax(torch.from_numpy(out), -1).numpy(), truth, data.classes)
            run.update(macro_auc=metrics["macro_auc"], accuracy=metrics["accuracy"])
        else:
            metrics = regression_metrics(out[:, 0] * sigma + mu, truth.astype(np.float64), baseline=mu)
            run.update(mae=metrics["mae"], mae_predict_train_mean=metrics["mae_predict_train_mean"])
        runs.setdefault(fraction, []).append(run)
    kind, names = ("finetune", CLASSIFY_METRICS) if task == "classify" else ("regress", REGRESS_METRICS)
    return {protocol_name(kind, f): _summarise(r, names, f) for f, r in runs.items()}


def label_efficiency(data_dir: str | Path, embeddings_path: str | Path | None, out_dir: str | Path, method: str,
                     checkpoint: str | Path | None, cfg: dict[str, Any], model_cfg: dict[str, Any], *,
                     regress_target: str, regress_label: str, domain: str, device: str = "auto",
                     threads: int = 1) -> dict[str, Any]:
    """Run the study for one method; write ``subsets.parquet`` and ``metrics.json`` under ``out_dir``; return the
    metrics. ``cfg`` is the validated ``label_efficiency`` section; ``domain`` is ``pretrain.augment.domain``
    (lensing or photo), ``regress_*`` come from the ``finetune`` section."""
    if "linear" in cfg["protocols"] and embeddings_path is None:
        raise ValueError("config key 'label_efficiency.protocols': 'linear' needs the method's embeddings file")
    out_dir = Path(out_dir)
    setup_process(threads, cfg["seed"])
    data = PreparedData(data_dir)
    manifest = data.dir / "manifest.parquet"
    rows = labelled_rows(data.rows())
    subsets = draw_subsets(rows, cfg, regress_target, regress_label, manifest)
    regress = {"target": regress_target, "label": regress_label}
    protocols: dict[str, Any] = {}
    timings: dict[str, float] = {}

    def timed(part: str, run) -> None:
        start = time.perf_counter()
        found = run()
        protocols.update(found)
        timings[part] = round(time.perf_counter() - start, 2)
        fits = sum(len(p["runs"]) for p in found.values())
        print(f"label_efficiency {method}: {part}: {fits} fits in {timings[part]:.1f} s", flush=True)

    if "linear" in cfg["protocols"]:
        # BLAS gets the job's threads, no more: the probes' many small solves slow down when oversubscribed.
        with threadpool_limits(limits=max(1, threads)):
            timed("linear", lambda: linear_study(embeddings_path, subsets, data.classes, cfg))
    provenance: dict[str, Any] = {}
    if {"finetune", "regress"} & set(cfg["protocols"]):
        backbone, provenance = load_backbone(method, checkpoint, model_cfg, data.channels, data.image_size,
                                             seed=cfg["seed"])
        dev = pick_device(device)
        for kind, task in (("finetune", "classify"), ("regress", "regress")):
            if kind in cfg["protocols"]:
                timed(kind, lambda task=task: finetune_study(data, rows, subsets, task, backbone, cfg, domain, dev,
                                                             regress))
    order = [protocol_name(k, float(f)) for k in PROTOCOLS for f in cfg["fractions"]]
    result = {
        "method": method,
        "protocols": {name: protocols[name] for name in order if name in protocols},
        "classes": data.classes,
        "regress_target": regress_target if "regress" in cfg["protocols"] else None,
        "seeds": [cfg["seed"] + i for i in range(cfg["seeds"])],
        "n_test": int((rows["split"] == "test").sum()),
        "warnings": class_warnings(rows, data.classes) if {"linear", "finetune"} & set(cfg["protocols"]) else [],
        "time_s": timings,
        "config": cfg,
        "domain": domain,
        "backbone": provenance,
        "embeddings": str(embeddings_path) if embeddings_path else None,
    }
    write_parquet(out_dir / "subsets.parquet", subsets)
    write_json(out_dir / "metrics.json", result)
    return result
