"""EsViT (Li et al., 2022): DINO's view-level loss plus a region-level loss on the patch tokens.

Each student patch token is matched to the most similar teacher patch token (cosine similarity of backbone
features) of the other view and trained to predict that token's centred, sharpened distribution, from a separate
region head with its own centre. Designed for Swin (multi-stage, no CLS token: the view-level feature is the
average-pooled last stage), and works on a ViT's patch tokens just the same.
"""
from __future__ import annotations

import torch
from torch import nn

from ssl4sci.ssl.dino import DINO
from ssl4sci.ssl.losses import RegionLoss
from ssl4sci.ssl.momentum import N_GLOBAL, StepLoss


class EsViT(DINO):
    method = "esvit"

    def build_heads(self, dim: int, student: bool) -> dict[str, nn.Module]:
        heads = super().build_heads(dim, student)
        if student:
            cfg = self.cfg
            self.region_loss = RegionLoss(cfg["out_dim"], cfg["student_temp"], cfg["center_momentum"])
        heads["region_head"] = self.make_head(dim, student)
        return heads

    def compute_loss(self, views: list[torch.Tensor], teacher_temp: float) -> StepLoss:
        w = float(self.cfg["esvit"]["region_weight"])
        with torch.no_grad():
            teacher = self.teacher(views[:N_GLOBAL])
            # The teacher's (B, M, out_dim) region outputs serve the targets and the centre only: both are taken now
            # and the outputs freed, before the student's activations exist (the step's memory peaks on top of them).
            region_targets = self.region_loss.targets(teacher.region_proj, teacher_temp)
            teacher.region_proj = [t.mean(dim=(0, 1), dtype=torch.float32)[None] for t in teacher.region_proj]
        # The student's region head runs inside the loss, a few images at a time, and again in backward
        # (RegionLoss): its (B, N, out_dim) outputs for every token of every view are never all kept.
        student = self.student(views, region_logits=False)
        view_loss = self.view_loss(student.proj, teacher.proj, teacher_temp)
        region_loss = self.region_loss(student.tokens, student.tokens, region_targets, teacher.tokens,
                                       head=self.student.region_head)
        loss = (1 - w) * view_loss + w * region_loss
        parts = {"view_loss": view_loss.detach(), "region_loss": region_loss.detach()}
        loss = self.add_koleo(loss, student, parts)
        return StepLoss(loss=loss, parts=parts, teacher_logits=teacher.proj, teacher=teacher)

    def update_centers(self, step: StepLoss) -> None:
        self.view_loss.update_center(step.teacher_logits)
        self.region_loss.update_center(step.teacher.region_proj)
