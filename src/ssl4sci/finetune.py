"""Finetune stage: the backbone plus a linear head, trained end to end on labels.

Tasks: ``classify`` (all classes; accuracy and one-vs-rest ROC AUC) and ``regress`` (a continuous
truth such as log10 m_axion on the images of one class; MAE against the predict-the-mean baseline).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ssl4sci.data import LABELLED_SPLITS, ImageDataset, PreparedData
from ssl4sci.io import save_figure, write_json
from ssl4sci.models import embed_dim, load_backbone, pick_device
from ssl4sci.runtime import setup_process, trainer_kwargs

# The (image, target) dataset, the metrics and the augmentation are shared with the label-efficiency stage
# (a neutral module, not a stage).
from ssl4sci.supervised import (  # noqa: F401
    TASKS,
    TargetDataset,
    classification_metrics,
    label_preserving_augment,
    regression_metrics,
)


class FineTuner(pl.LightningModule):
    def __init__(self, backbone: nn.Module, n_out: int, task: str, cfg: dict[str, Any], epochs: int):
        super().__init__()
        self.backbone, self.task, self.cfg, self.epochs = backbone, task, cfg, epochs
        self.head = nn.Linear(embed_dim(backbone), n_out)
        self.val_history: list[float] = []
        self._val_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x):
        return self.head(self.backbone(x))

    def _loss(self, out, y):
        return F.cross_entropy(out, y) if self.task == "classify" else F.mse_loss(out.squeeze(-1), y)

    def training_step(self, batch, _):
        x, y = batch
        loss = self._loss(self(x), y)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(x))
        return loss

    def validation_step(self, batch, _):
        x, y = batch
        self._val_outputs.append((self(x).detach().cpu(), y.cpu()))

    def on_validation_epoch_end(self):
        if not self._val_outputs:
            return
        out = torch.cat([o for o, _ in self._val_outputs])
        y = torch.cat([t for _, t in self._val_outputs])
        self._val_outputs = []
        if self.task == "classify":
            value = (out.argmax(-1) == y).float().mean().item()
        else:
            value = (out.squeeze(-1) - y).abs().mean().item()
        if not self.trainer.sanity_checking:
            self.val_history.append(value)

    def configure_optimizers(self):
        groups = [{"params": self.head.parameters(), "lr": self.cfg["lr"]}]
        if self.cfg["backbone_lr_scale"] > 0:
            groups.append({"params": self.backbone.parameters(), "lr": self.cfg["lr"] * self.cfg["backbone_lr_scale"]})
        else:
            self.backbone.requires_grad_(False)
        opt = torch.optim.AdamW(groups, weight_decay=self.cfg["weight_decay"])
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(self.epochs, 1))
        return [opt], [sched]


def finetune(data_dir: str | Path, out_dir: str | Path, method: str, checkpoint: str | Path | None, task: str,
             cfg: dict[str, Any], model_cfg: dict[str, Any], device: str, threads: int = 1, progress: bool = True, *,
             domain: str) -> dict[str, Any]:
    """Fine-tune ``method``'s backbone with a head on the train labels; ``domain`` (pretrain.augment.domain) picks the
    label-preserving augmentation: flips and 90° rotations for lensing, horizontal flips only for photos."""
    if task not in TASKS:
        raise ValueError(f"config key 'finetune.tasks': unknown task '{task}', expected one of {TASKS}")
    out_dir = Path(out_dir)
    setup_process(threads, cfg["seed"])
    data = PreparedData(data_dir)
    rows = data.rows(LABELLED_SPLITS)  # never the unlabelled pool
    if task == "regress":
        target = cfg["regress_target"]
        if target not in rows.columns:
            raise ValueError(f"config key 'finetune.regress_target': column '{target}' is not in "
                             f"{data.dir / 'manifest.parquet'}")
        rows = rows[(rows["label"] == cfg["regress_label"]) & np.isfinite(rows[target].astype(float))]
    splits = {s: rows[rows["split"] == s] for s in ("train", "val", "test")}
    for s in ("train", "test"):
        if len(splits[s]) == 0:
            of_class = f" (class '{cfg['regress_label']}')" if task == "regress" else ""
            raise ValueError(f"{data.dir / 'manifest.parquet'}: no {s} images for task '{task}'{of_class}")

    if task == "classify":
        targets = {s: r["label_id"].to_numpy() for s, r in splits.items()}
        n_out, mu, sigma = len(data.classes), 0.0, 1.0
    else:
        raw = {s: r[cfg["regress_target"]].to_numpy(dtype=np.float64) for s, r in splits.items()}
        mu, sigma = float(raw["train"].mean()), float(raw["train"].std() or 1.0)
        targets = {s: (v - mu) / sigma for s, v in raw.items()}
        n_out = 1

    backbone, provenance = load_backbone(method, checkpoint, model_cfg, data.channels, data.image_size,
                                         seed=cfg["seed"])
    backbone.train()
    augment = label_preserving_augment(domain) if cfg["augment"] else None
    train_ds = TargetDataset(ImageDataset(data, splits["train"], transform=augment), targets["train"], task)
    val_ds = TargetDataset(ImageDataset(data, splits["val"]), targets["val"], task)
    test_ds = TargetDataset(ImageDataset(data, splits["test"]), targets["test"], task)
    loader = lambda ds, shuffle: DataLoader(ds, batch_size=cfg["batch_size"], shuffle=shuffle,  # noqa: E731
                                            num_workers=cfg["num_workers"])

    module = FineTuner(backbone, n_out, task, cfg, cfg["epochs"])
    trainer = pl.Trainer(max_epochs=cfg["epochs"], logger=False, enable_checkpointing=False,
                         enable_progress_bar=progress, num_sanity_val_steps=0, **trainer_kwargs(device))
    trainer.fit(module, loader(train_ds, True), loader(val_ds, False) if len(val_ds) else None)

    dev = pick_device(device)
    module = module.to(dev).eval()
    outputs, ys = [], []
    with torch.no_grad():
        for x, y in loader(test_ds, False):
            outputs.append(module(x.to(dev)).float().cpu())
            ys.append(y)
    out, y = torch.cat(outputs).numpy(), torch.cat(ys).numpy()

    result: dict[str, Any] = {"method": method, "task": task, "n_train": len(train_ds), "n_val": len(val_ds),
                              "n_test": len(test_ds), "config": cfg, "backbone": provenance}
    if task == "classify":
        probs = torch.softmax(torch.from_numpy(out), -1).numpy()
        result["metrics"], curves = classification_metrics(probs, y, data.classes)
        result["val_accuracy_per_epoch"] = module.val_history
        plot_roc(curves, out_dir / "roc.png", method)
    else:
        pred = out[:, 0] * sigma + mu
        truth = y * sigma + mu
        result["metrics"] = regression_metrics(pred, truth, baseline=mu)
        result["metrics"]["target"] = cfg["regress_target"]
        result["val_mae_per_epoch_standardised"] = module.val_history
        plot_scatter(pred, truth, out_dir / "scatter.png", method, cfg["regress_target"])
    write_json(out_dir / "metrics.json", result)
    return result


def plot_roc(curves: dict, path: Path, method: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 4))
    for name, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"{method}: one-vs-rest ROC (test)")
    ax.legend(fontsize=8)
    save_figure(path, fig)


def plot_scatter(pred: np.ndarray, truth: np.ndarray, path: Path, method: str, target: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.scatter(truth, pred, s=8, alpha=0.6)
    lo, hi = float(min(truth.min(), pred.min())), float(max(truth.max(), pred.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xlabel(f"true {target}")
    ax.set_ylabel(f"predicted {target}")
    ax.set_title(f"{method}: regression (test)")
    save_figure(path, fig)
