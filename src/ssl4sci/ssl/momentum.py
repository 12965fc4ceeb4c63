"""The shared machinery of self-distillation with a momentum teacher (DINO, EsViT), as a LightningModule.

A subclass names its heads (``build_heads``) and its loss (``compute_loss``, ``update_centers``); everything else
lives here and reads top to bottom: schedules indexed by the global step, the EMA teacher, the last layer frozen
early, per-epoch statistics (loss, teacher entropy and KL, crop rejections, online k-NN, effective rank of the
teacher backbone's features, also measured once before training), the collapse guard, and a
checkpoint that holds everything needed to resume plus the teacher backbone for the downstream stages.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from ssl4sci.models import backbone_tokens, create_backbone, embed_dim
from ssl4sci.runtime import compile_in_place
from ssl4sci.ssl.guard import CollapseGuard, TrainingCollapsed, teacher_statistics
from ssl4sci.ssl.running import RunningStats
from ssl4sci.ssl.schedules import cosine_schedule, teacher_temperature

N_GLOBAL = 2  # the teacher sees the two global views; the student sees all


@dataclass
class EncoderOutput:
    """Per view (in input order): head outputs; with a region head also patch tokens and (unless the encoder was
    asked to leave them to its caller) their region-head outputs."""

    proj: list[torch.Tensor]
    pooled: list[torch.Tensor] = field(default_factory=list)  # backbone features per view (for KoLeo)
    tokens: list[torch.Tensor] = field(default_factory=list)
    # (B, N, out_dim) per view; EsViT's step keeps only each view's (1, out_dim) mean, all its centre needs
    region_proj: list[torch.Tensor] = field(default_factory=list)


def resolution_groups(views: list[torch.Tensor]) -> list[tuple[int, int]]:
    """[start, end) runs of consecutive views with the same size: one backbone pass per crop size."""
    groups, start = [], 0
    while start < len(views):
        end = start
        while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
            end += 1
        groups.append((start, end))
        start = end
    return groups


class Encoder(nn.Module):
    """Backbone + view head (+ region head on the patch tokens, for EsViT)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, region_head: nn.Module | None = None):
        super().__init__()
        self.backbone, self.head, self.region_head = backbone, head, region_head

    def last_layers(self) -> list[nn.Parameter]:
        heads = [self.head] + ([self.region_head] if self.region_head is not None else [])
        return [p for h in heads for p in h.last_layer.parameters()]

    def forward(self, views: list[torch.Tensor], region_logits: bool = True) -> EncoderOutput:
        """``region_logits=False`` leaves the region head to the caller (``region_proj`` stays empty): the
        (B, N, out_dim) outputs of every token of every view would dominate a training step's memory, so EsViT's
        student applies its region head inside the loss, a few images at a time."""
        pooled: list[torch.Tensor] = []
        out = EncoderOutput(proj=[])
        for start, end in resolution_groups(views):
            x = torch.cat(views[start:end])
            n = end - start
            if self.region_head is None:
                pooled.extend(self.backbone(x).chunk(n))
            else:
                p, tokens = backbone_tokens(self.backbone, x)
                pooled.extend(p.chunk(n))
                out.tokens.extend(tokens.chunk(n))
                if region_logits:
                    out.region_proj.extend(self.region_head(tokens).chunk(n))
        out.pooled = pooled
        out.proj = list(self.head(torch.cat(pooled)).chunk(len(views)))
        return out


@dataclass
class StepLoss:
    loss: torch.Tensor
    parts: dict[str, torch.Tensor]  # named terms, logged per epoch (e.g. view_loss, region_loss)
    teacher_logits: list[torch.Tensor]  # the teacher's view-level outputs, for the collapse statistics
    teacher: EncoderOutput  # everything the centre updates need


class MomentumSSL(pl.LightningModule):
    """Student/teacher self-distillation; subclasses define the heads and the loss."""

    method = "momentum"

    def __init__(self, cfg: dict[str, Any], model_cfg: dict[str, Any], in_chans: int, img_size: int,
                 steps_per_epoch: int, world_batch: int, monitor=None, data_counts: dict[str, int] | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["monitor", "data_counts"])
        self.cfg = cfg
        self.data_counts = dict(data_counts or {})  # images trained on (n_train, n_unlabelled), kept in the checkpoint
        student_backbone = create_backbone(model_cfg, in_chans, img_size)
        teacher_backbone = create_backbone(model_cfg, in_chans, img_size, drop_path_rate=0.0)
        dim = embed_dim(student_backbone)
        self.student = Encoder(student_backbone, **self.build_heads(dim, student=True))
        self.teacher = Encoder(teacher_backbone, **self.build_heads(dim, student=False))
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)

        epochs = cfg["epochs"]
        total = epochs * steps_per_epoch
        peak_lr = cfg["base_lr"] * world_batch / 256.0  # linear scaling rule
        self.lr_schedule = cosine_schedule(peak_lr, cfg["min_lr"], total, cfg["warmup_epochs"] * steps_per_epoch)
        self.wd_schedule = cosine_schedule(cfg["weight_decay"], cfg["weight_decay_end"], total)
        self.momentum_schedule = cosine_schedule(cfg["momentum_teacher"], 1.0, total)
        self.teacher_temps = teacher_temperature(cfg["warmup_teacher_temp"], cfg["teacher_temp"],
                                                 cfg["warmup_teacher_temp_epochs"], epochs)
        guard = cfg["guard"]
        warmups = max(cfg["warmup_epochs"], cfg["warmup_teacher_temp_epochs"], cfg["freeze_last_layer_epochs"])
        self.guard = CollapseGuard(cfg["out_dim"], guard, warmups, warn=self._warn) if guard["enabled"] else None
        self.monitor = monitor
        self.initial_rank = math.nan  # effective rank of the untrained network's features (the monitor's subset)
        self.history: list[dict[str, float]] = []
        self._stats = RunningStats()  # this epoch's, on the training device
        # Called on each batch after its copy to the device (pretrain.DeviceViews cuts the views there), or None.
        self.batch_transform = None
        self._epoch_start = time.time()
        self._elapsed_before = 0.0
        self._in_epoch = False  # between on_train_epoch_start and the end of on_train_epoch_end
        self._partial_epoch: dict[str, Any] | None = None  # restored from a mid-epoch (preemption) checkpoint
        self._ema_pairs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None  # (teacher, student) parameters

    # --- what a method defines ----------------------------------------------------------------
    def build_heads(self, dim: int, student: bool) -> dict[str, nn.Module]:
        raise NotImplementedError

    def compute_loss(self, views: list[torch.Tensor], teacher_temp: float) -> StepLoss:
        raise NotImplementedError

    def update_centers(self, step: StepLoss) -> None:
        raise NotImplementedError

    def view_center(self) -> torch.Tensor:
        """The centre subtracted from the teacher's view-level outputs (for the collapse statistics)."""
        raise NotImplementedError

    # --- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self):
        # No weight decay on biases and norms, as in DINO; the schedule sets wd on group 0 only.
        decay, no_decay = [], []
        for name, p in self.student.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
        # fused: one kernel for the whole update on a GPU (its CPU version would change the arithmetic)
        return torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
                                 lr=float(self.lr_schedule[0]), fused=True if self.device.type == "cuda" else None)

    def _step_index(self) -> int:
        return min(self.global_step, len(self.lr_schedule) - 1)

    def _epoch_index(self) -> int:
        return min(self.current_epoch, len(self.teacher_temps) - 1)

    def on_train_batch_start(self, batch, batch_idx):
        it = self._step_index()
        opt = self.optimizers().optimizer if hasattr(self.optimizers(), "optimizer") else self.optimizers()
        for i, group in enumerate(opt.param_groups):
            group["lr"] = float(self.lr_schedule[it])
            if i == 0:
                group["weight_decay"] = float(self.wd_schedule[it])

    def on_after_batch_transfer(self, batch, dataloader_idx):
        return self.batch_transform(batch) if self.batch_transform is not None else batch

    def training_step(self, batch, batch_idx):
        crops, _ = batch
        views = crops["views"]
        teacher_temp = float(self.teacher_temps[self._epoch_index()])
        step = self.compute_loss(views, teacher_temp)
        entropy, kl = teacher_statistics(step.teacher_logits, self.view_center(), teacher_temp)
        self.update_centers(step)
        values = {"train_loss": step.loss, "teacher_entropy": entropy, "teacher_kl": kl, **step.parts,
                  "crops": crops["crops"].sum(), "crop_rejects": crops["crop_rejects"].sum()}
        self._stats.add(values, step.loss, self.global_step, self.current_epoch)
        if (self.global_step + 1) % self.cfg["sync_every_steps"] == 0:  # the host reads the device only here
            self._check_finite()
            self.log("train_loss", step.loss.detach(), prog_bar=True, on_step=True, on_epoch=False,
                     batch_size=views[0].shape[0])
        return step.loss

    def _reduce(self):
        """The sum over every process, or None for one process."""
        if self.trainer.world_size == 1:
            return None
        return lambda t: self.trainer.strategy.reduce(t, reduce_op="sum")

    def _check_finite(self) -> None:
        """Stop on a non-finite loss, on every process at the same step (a collective under DDP)."""
        self._stats.check_finite(self.method, self._reduce())

    def on_after_backward(self):
        # Freezing the prototypes early avoids the collapse DINO reports for the first epoch.
        if self.current_epoch < self.cfg["freeze_last_layer_epochs"]:
            for p in self.student.last_layers():
                p.grad = None

    def on_train_batch_end(self, outputs, batch, batch_idx):
        m = float(self.momentum_schedule[self._step_index()])
        if self._ema_pairs is None:
            self._ema_pairs = (list(self.teacher.parameters()), [p.detach() for p in self.student.parameters()])
        teacher, student = self._ema_pairs
        with torch.no_grad():  # teacher <- teacher + (1 - m)(student - teacher), every tensor in one foreach op
            torch._foreach_lerp_(teacher, student, 1 - m)

    # --- compilation --------------------------------------------------------------------------
    def on_fit_start(self):
        """With ``pretrain.compile``, compile the student's and the teacher's forward (backbone and heads) now, on
        views of the training shapes; a compiler that fails leaves them eager (``runtime.compile_in_place``)."""
        setting = self.cfg["compile"]
        if setting is False:
            return
        views = self._example_views()
        context = self.trainer.precision_plugin.train_step_context

        def student_step():
            with context():
                loss = sum(p.float().mean() for p in self.student(views).proj)
            loss.backward()
            self.student.zero_grad(set_to_none=True)

        def teacher_pass():
            with torch.no_grad(), context():
                self.teacher(views[:N_GLOBAL])

        compile_in_place(self.student, setting, student_step, f"{self.method} student", self._warn)
        compile_in_place(self.teacher, setting, teacher_pass, f"{self.method} teacher", self._warn)

    def _example_views(self) -> list[torch.Tensor]:
        """Random views of one process's batch in the training shapes: two global, then the local ones."""
        cfg, chans = self.cfg, self.hparams.in_chans
        batch = max(1, self.hparams.world_batch // self.trainer.world_size)
        sizes = [cfg["global_crop_size"]] * N_GLOBAL + [cfg["local_crop_size"]] * cfg["local_crops_number"]
        return [torch.randn(batch, chans, s, s, device=self.device) for s in sizes]

    # --- per-epoch statistics -----------------------------------------------------------------
    def _measure(self, knn: bool = True) -> dict[str, float]:
        """The monitor's measurements of the teacher backbone, rank 0's on every rank: the guard must decide alike."""
        values = self.monitor.measure(self.teacher.backbone, self.device, knn=knn)
        return self.trainer.strategy.broadcast(values, src=0) if self.trainer.world_size > 1 else values

    def _warn(self, message: str) -> None:
        if self.trainer.is_global_zero:
            print(f"ssl4sci pretrain: {self.method}: {message}", file=sys.stderr, flush=True)

    def on_train_start(self):
        # The untrained network's effective rank, the reference of the dimensional-collapse check (a resumed run
        # has it from its checkpoint; its network is no longer untrained).
        if self.monitor is not None and self.monitor.every and self.global_step == 0 and math.isnan(self.initial_rank):
            self.initial_rank = self._measure(knn=False)["effective_rank"]
        # Resuming mid-epoch, Lightning does not call on_train_epoch_start: continue the interrupted epoch's
        # statistics and clock where the checkpoint left them.
        if self._partial_epoch is not None:
            self._stats.load_state_dict(self._partial_epoch["stats"], self.device)
            self._epoch_start = time.time() - float(self._partial_epoch["elapsed_s"])
            self._in_epoch = True
            self._partial_epoch = None

    def on_train_epoch_start(self):
        self._stats = RunningStats()
        self._epoch_start = time.time()
        self._in_epoch = True

    def _epoch_means(self) -> dict[str, float]:
        """Per-step means over every process's steps, and the share of the candidate boxes drawn that were rejected:
        every box drawn is either a view or a rejection (a view with no box above the threshold keeps the best of
        its tries)."""
        means = self._stats.means(self._reduce())
        crops, rejects = means.pop("crops", math.nan), means.pop("crop_rejects", math.nan)
        if math.isfinite(crops):
            drawn = crops + rejects
            means["crop_reject_rate"] = rejects / drawn if drawn else math.nan
        return means

    def on_train_epoch_end(self):
        self._check_finite()  # before the epoch's checkpoint (WorkCheckpoint saves after this hook)
        it = self._step_index()
        means = self._epoch_means()
        self._elapsed_before += time.time() - self._epoch_start
        row = {
            "epoch": self.current_epoch,
            "step": self.global_step,
            "train_loss": means.pop("train_loss", math.nan),
            **means,
            "lr": float(self.lr_schedule[it]),
            "weight_decay": float(self.wd_schedule[it]),
            "momentum_teacher": float(self.momentum_schedule[it]),
            "teacher_temp": float(self.teacher_temps[self._epoch_index()]),
            "knn_val": math.nan,
            "effective_rank": math.nan,
            "pc1_share": math.nan,
            "effective_rank_init": self.initial_rank,
            "time_s": self._elapsed_before,
        }
        if self.monitor is not None and self.monitor.due(self.current_epoch, self.cfg["epochs"]):
            row.update(self._measure())
            if math.isfinite(row["knn_val"]):  # NaN without val images
                self.log("knn_val", row["knn_val"], sync_dist=self.trainer.world_size > 1)
        self.history.append(row)
        # Equal on every rank already; sync_dist only spares Lightning's warning about unsynced epoch metrics.
        self.log("epoch_loss", row["train_loss"], sync_dist=self.trainer.world_size > 1)
        self._in_epoch = False
        if self.guard is not None:
            reason = self.guard.check(row)
            if reason:
                raise TrainingCollapsed(f"{self.method}: {reason}")

    # --- checkpoint: everything needed to resume, plus the teacher backbone for downstream stages ---
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._check_finite()  # nothing after a non-finite loss is ever saved
        checkpoint["history"] = self.history
        checkpoint["elapsed_s"] = self._elapsed_before
        checkpoint["initial_rank"] = self.initial_rank
        if self.guard is not None:
            checkpoint["guard"] = self.guard.state_dict()
        if self._in_epoch:  # saved mid-epoch (preemption): the epoch's statistics so far (rank 0's) and its time
            checkpoint["partial_epoch"] = {"stats": self._stats.state_dict(),
                                           "elapsed_s": time.time() - self._epoch_start}
        checkpoint["teacher_backbone"] = self.teacher.backbone.state_dict()
        checkpoint["ssl4sci"] = {
            "method": self.method,
            "model": self.hparams.model_cfg,
            "in_chans": self.hparams.in_chans,
            "img_size": self.hparams.img_size,
            **self.data_counts,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.history = list(checkpoint.get("history", []))
        self._elapsed_before = float(checkpoint.get("elapsed_s", 0.0))
        self.initial_rank = float(checkpoint.get("initial_rank", math.nan))
        self._partial_epoch = checkpoint.get("partial_epoch")
        if self.guard is not None and "guard" in checkpoint:
            self.guard.load_state_dict(checkpoint["guard"])

