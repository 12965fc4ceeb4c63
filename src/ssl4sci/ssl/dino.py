"""DINO (Caron et al., 2021) as a LightningModule: student/teacher ViTs, EMA teacher, centred sharpened targets.

Read top to bottom: ``training_step`` is the whole algorithm; schedules are arrays indexed by the global step.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from ssl4sci.models import create_backbone, embed_dim
from ssl4sci.ssl.heads import DINOHead
from ssl4sci.ssl.losses import DINOLoss
from ssl4sci.ssl.schedules import cosine_schedule, teacher_temperature


class BackboneWithHead(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        """Views grouped by resolution: one backbone pass per crop size, one head pass for all."""
        sizes = [v.shape[-1] for v in views]
        feats, start = [], 0
        while start < len(views):
            end = start
            while end < len(views) and sizes[end] == sizes[start]:
                end += 1
            feats.append(self.backbone(torch.cat(views[start:end])))
            start = end
        return self.head(torch.cat(feats))


class DINO(pl.LightningModule):
    def __init__(self, cfg: dict[str, Any], model_cfg: dict[str, Any], in_chans: int, img_size: int, steps_per_epoch: int, world_batch: int):
        super().__init__()
        self.save_hyperparameters()
        self.cfg = cfg
        student_backbone = create_backbone(model_cfg, in_chans, img_size)
        teacher_backbone = create_backbone(model_cfg, in_chans, img_size, drop_path_rate=0.0)
        dim = embed_dim(student_backbone)
        head_kwargs = dict(hidden_dim=cfg["head_hidden_dim"], bottleneck_dim=cfg["head_bottleneck_dim"])
        self.student = BackboneWithHead(student_backbone, DINOHead(dim, cfg["out_dim"], norm_last_layer=cfg["norm_last_layer"], **head_kwargs))
        self.teacher = BackboneWithHead(teacher_backbone, DINOHead(dim, cfg["out_dim"], **head_kwargs))
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.loss_fn = DINOLoss(cfg["out_dim"], cfg["student_temp"], cfg["center_momentum"])

        epochs = cfg["epochs"]
        total = epochs * steps_per_epoch
        peak_lr = cfg["base_lr"] * world_batch / 256.0  # linear scaling rule
        self.lr_schedule = cosine_schedule(peak_lr, cfg["min_lr"], total, cfg["warmup_epochs"] * steps_per_epoch)
        self.wd_schedule = cosine_schedule(cfg["weight_decay"], cfg["weight_decay_end"], total)
        self.momentum_schedule = cosine_schedule(cfg["momentum_teacher"], 1.0, total)
        self.teacher_temps = teacher_temperature(cfg["warmup_teacher_temp"], cfg["teacher_temp"], cfg["warmup_teacher_temp_epochs"], epochs)
        self.history: list[dict[str, float]] = []
        self._epoch_losses: list[float] = []
        self._epoch_start = time.time()
        self._elapsed_before = 0.0
        self._in_epoch = False  # between on_train_epoch_start and the end of on_train_epoch_end
        self._partial_epoch: dict[str, Any] | None = None  # restored from a mid-epoch (preemption) checkpoint

    # --- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self):
        # No weight decay on biases and norms, as in DINO; the schedule sets wd on group 0 only.
        decay, no_decay = [], []
        for name, p in self.student.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
        return torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=float(self.lr_schedule[0]))

    def _step_index(self) -> int:
        return min(self.global_step, len(self.lr_schedule) - 1)

    def on_train_batch_start(self, batch, batch_idx):
        it = self._step_index()
        opt = self.optimizers().optimizer if hasattr(self.optimizers(), "optimizer") else self.optimizers()
        for i, group in enumerate(opt.param_groups):
            group["lr"] = float(self.lr_schedule[it])
            if i == 0:
                group["weight_decay"] = float(self.wd_schedule[it])

    def training_step(self, batch, batch_idx):
        views, _ = batch
        n_global = 2
        epoch = min(self.current_epoch, len(self.teacher_temps) - 1)
        with torch.no_grad():
            teacher_out = self.teacher(views[:n_global]).chunk(n_global)
        student_out = self.student(views).chunk(len(views))
        loss = self.loss_fn(list(student_out), list(teacher_out), float(self.teacher_temps[epoch]))
        self.loss_fn.update_center(list(teacher_out))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"DINO loss is {loss.item()} at step {self.global_step}; lower pretrain.base_lr or use precision 32-true")
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=views[0].shape[0])
        self._epoch_losses.append(loss.detach().item())
        return loss

    def on_after_backward(self):
        # Freezing the prototypes early avoids the collapse DINO reports for the first epoch.
        if self.current_epoch < self.cfg["freeze_last_layer_epochs"]:
            for p in self.student.head.last_layer.parameters():
                p.grad = None

    def on_train_batch_end(self, outputs, batch, batch_idx):
        m = float(self.momentum_schedule[self._step_index()])
        with torch.no_grad():
            for ps, pt in zip(self.student.parameters(), self.teacher.parameters()):
                pt.mul_(m).add_(ps.detach(), alpha=1 - m)

    def on_train_start(self):
        # Resuming mid-epoch, Lightning does not call on_train_epoch_start: continue the interrupted epoch's
        # loss list and clock where the checkpoint left them.
        if self._partial_epoch is not None:
            self._epoch_losses = list(self._partial_epoch["losses"])
            self._epoch_start = time.time() - float(self._partial_epoch["elapsed_s"])
            self._in_epoch = True
            self._partial_epoch = None

    def on_train_epoch_start(self):
        self._epoch_losses = []
        self._epoch_start = time.time()
        self._in_epoch = True

    def on_train_epoch_end(self):
        it = self._step_index()
        loss = float(np.mean(self._epoch_losses)) if self._epoch_losses else math.nan
        if self.trainer.world_size > 1:
            loss = float(self.trainer.strategy.reduce(torch.tensor(loss, device=self.device), reduce_op="mean"))
        self._elapsed_before += time.time() - self._epoch_start
        self.history.append(
            {
                "epoch": self.current_epoch,
                "step": self.global_step,
                "train_loss": loss,
                "lr": float(self.lr_schedule[it]),
                "weight_decay": float(self.wd_schedule[it]),
                "momentum_teacher": float(self.momentum_schedule[it]),
                "teacher_temp": float(self.teacher_temps[min(self.current_epoch, len(self.teacher_temps) - 1)]),
                "time_s": self._elapsed_before,
            }
        )
        # Equal on every rank already; sync_dist only spares Lightning's warning about unsynced epoch metrics.
        self.log("epoch_loss", loss, sync_dist=self.trainer.world_size > 1)
        self._in_epoch = False

    # --- checkpoint: everything needed to resume, plus the teacher backbone for downstream stages ---
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["history"] = self.history
        checkpoint["elapsed_s"] = self._elapsed_before
        if self._in_epoch:  # saved mid-epoch (preemption): the epoch's losses so far (rank 0's) and its time
            checkpoint["partial_epoch"] = {"losses": list(self._epoch_losses), "elapsed_s": time.time() - self._epoch_start}
        checkpoint["teacher_backbone"] = self.teacher.backbone.state_dict()
        checkpoint["ssl4sci"] = {
            "method": "dino",
            "model": self.hparams.model_cfg,
            "in_chans": self.hparams.in_chans,
            "img_size": self.hparams.img_size,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.history = list(checkpoint.get("history", []))
        self._elapsed_before = float(checkpoint.get("elapsed_s", 0.0))
        self._partial_epoch = checkpoint.get("partial_epoch")
