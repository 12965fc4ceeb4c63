"""Supervised training pieces shared by the stages that train on labels (finetune, label_efficiency).

No stage owns this module: label-preserving augmentations per image domain, a plain torch loop of a fixed number
of optimisation steps (no Lightning Trainer: the label-efficiency study runs dozens of short fits per job, where a
Trainer's start-up would cost more than the fit), prediction, and the classification and regression metrics.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ssl4sci.models import embed_dim
from ssl4sci.ssl.augment import RandomSymmetry

TASKS = ("classify", "regress")


def label_preserving_augment(domain: str) -> nn.Module:
    """A random element of the domain's symmetries (``ssl.augment.DOMAIN_SYMMETRIES``, the ones pretraining's views
    use too): flips and 90° rotations for lensing images, horizontal flips for photos."""
    return RandomSymmetry(domain)


class TargetDataset(Dataset):
    """(image, target) pairs over an ``ImageDataset``: class index (classify) or float target (regress)."""

    def __init__(self, images: Dataset, targets: np.ndarray, task: str):
        if len(images) != len(targets):
            raise ValueError(f"expected one target per image, got {len(targets)} targets for {len(images)} images")
        self.images, self.targets, self.task = images, np.asarray(targets), task

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        img = self.images[i][0]
        t = self.targets[i]
        return img, (torch.tensor(int(t)) if self.task == "classify" else torch.tensor(float(t), dtype=torch.float32))


class BackboneWithHead(nn.Module):
    """A backbone's pooled feature followed by a linear layer."""

    def __init__(self, backbone: nn.Module, n_out: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(embed_dim(backbone), n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def step_batches(n: int, steps: int, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """``steps`` batches of indices into ``n`` items: back-to-back seeded permutations, so every item is drawn once
    before any is drawn twice. A batch never exceeds ``n`` items (a tiny subset gives full-subset batches)."""
    size = min(batch_size, n)
    needed = steps * size
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(math.ceil(needed / n))])[:needed]
    return order.view(steps, size).tolist()


def warmup_cosine(steps: int, warmup_steps: int):
    """Learning-rate factor per step: linear warm-up, then cosine decay to zero at ``steps``."""
    warmup = min(warmup_steps, max(steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(steps - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def train_steps(model: BackboneWithHead, dataset: Dataset, task: str, cfg: dict[str, Any], device: torch.device,
                seed: int) -> list[float]:
    """Train ``model`` end to end for ``cfg['steps']`` AdamW steps on ``dataset``; returns the loss of each step.

    ``cfg`` keys: steps, batch_size, lr (head), backbone_lr_scale (0 freezes the backbone), weight_decay,
    warmup_steps, num_workers. bf16 autocast on CUDA; CPU runs fp32.
    """
    generator = torch.Generator().manual_seed(seed)
    batches = step_batches(len(dataset), cfg["steps"], cfg["batch_size"], generator)
    groups = [{"params": model.head.parameters(), "lr": cfg["lr"]}]
    model.backbone.requires_grad_(cfg["backbone_lr_scale"] > 0)
    if cfg["backbone_lr_scale"] > 0:
        groups.append({"params": model.backbone.parameters(), "lr": cfg["lr"] * cfg["backbone_lr_scale"]})
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg["weight_decay"])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg["steps"], cfg["warmup_steps"]))
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=cfg["num_workers"])
    model.to(device).train()
    losses = []
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(x)
        out = out.float()
        loss = F.cross_entropy(out, y) if task == "classify" else F.mse_loss(out.squeeze(-1), y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the supervised loss turned {loss.item()} at step {len(losses)}; "
                                     "lower the learning rate (lr) of this stage")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def predict(model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device, num_workers: int):
    """Model outputs (N, n_out) float32 and targets (N,) for every item of ``dataset``, in order."""
    model.to(device).eval()
    outputs, targets = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            outputs.append(model(x.to(device)).float().cpu())
        targets.append(y)
    return torch.cat(outputs).numpy(), torch.cat(targets).numpy()


def classification_metrics(probs: np.ndarray, y: np.ndarray, classes: list[str]):
    """Accuracy, macro one-vs-rest ROC AUC and per-class AUC; plus the ROC curves per class."""
    acc = float((probs.argmax(1) == y).mean())
    aucs, curves = {}, {}
    for k, name in enumerate(classes):
        positives = y == k
        if positives.all() or not positives.any():
            continue  # AUC is undefined without both positives and negatives
        aucs[name] = float(roc_auc_score(positives, probs[:, k]))
        fpr, tpr, _ = roc_curve(positives, probs[:, k])
        curves[name] = (fpr, tpr, aucs[name])
    macro = float(np.mean(list(aucs.values()))) if aucs else float("nan")
    return {"accuracy": acc, "macro_auc": macro, "auc_per_class": aucs}, curves


def regression_metrics(pred: np.ndarray, truth: np.ndarray, baseline: float) -> dict[str, float]:
    """MAE, RMSE, R² and the MAE of predicting ``baseline`` (the training mean) for every item."""
    err = pred - truth
    ss_res = float((err**2).sum())
    ss_tot = float(((truth - truth.mean()) ** 2).sum())
    return {
        "mae": float(np.abs(err).mean()),
        "rmse": float(np.sqrt((err**2).mean())),
        "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan"),
        "mae_predict_train_mean": float(np.abs(truth - baseline).mean()),
        "n": int(len(truth)),
    }
