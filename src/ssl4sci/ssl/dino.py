"""DINO (Caron et al., 2021): the student matches the centred, sharpened teacher on the CLS-level head outputs,
across every pair of views except identical ones. The momentum machinery is in ``ssl.momentum``."""
from __future__ import annotations

import torch
from torch import nn

from ssl4sci.ssl.heads import DINOHead
from ssl4sci.ssl.losses import DINOLoss, koleo_loss
from ssl4sci.ssl.momentum import N_GLOBAL, MomentumSSL, StepLoss


class DINO(MomentumSSL):
    method = "dino"

    def build_heads(self, dim: int, student: bool) -> dict[str, nn.Module]:
        cfg = self.cfg
        if student:  # built once per network: the loss and its centre belong to the module, not a head
            self.view_loss = DINOLoss(cfg["out_dim"], cfg["student_temp"], cfg["center_momentum"])
        return {"head": self.make_head(dim, student)}

    def make_head(self, dim: int, student: bool) -> DINOHead:
        cfg = self.cfg
        # The teacher's gain is never trained: with norm_last_layer it stays at 1 like the student's; without,
        # it follows the student's by EMA.
        return DINOHead(dim, cfg["out_dim"], hidden_dim=cfg["head_hidden_dim"],
                        bottleneck_dim=cfg["head_bottleneck_dim"], norm_last_layer=cfg["norm_last_layer"])

    def compute_loss(self, views: list[torch.Tensor], teacher_temp: float) -> StepLoss:
        with torch.no_grad():
            teacher = self.teacher(views[:N_GLOBAL])
        student = self.student(views)
        loss = self.view_loss(student.proj, teacher.proj, teacher_temp)
        parts = {"view_loss": loss.detach()} if self.cfg["koleo_weight"] > 0 else {}
        loss = self.add_koleo(loss, student, parts)
        return StepLoss(loss=loss, parts=parts, teacher_logits=teacher.proj, teacher=teacher)

    def add_koleo(self, loss: torch.Tensor, student, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """``loss`` plus ``koleo_weight`` x KoLeo on the student's backbone features of each global view, averaged
        (as DINOv2 does), logged in ``parts`` as ``koleo_loss``; ``loss`` itself when the weight is 0."""
        if self.cfg["koleo_weight"] <= 0:
            return loss
        koleo = sum(koleo_loss(p) for p in student.pooled[:N_GLOBAL]) / N_GLOBAL
        parts["koleo_loss"] = koleo.detach()
        return loss + self.cfg["koleo_weight"] * koleo

    def update_centers(self, step: StepLoss) -> None:
        self.view_loss.update_center(step.teacher_logits)

    def view_center(self) -> torch.Tensor:
        return self.view_loss.center
