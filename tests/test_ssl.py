import math

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import MODEL_CFG
from ssl4sci.ssl.augment import MultiCrop
from ssl4sci.ssl.dino import DINO
from ssl4sci.ssl.heads import DINOHead
from ssl4sci.ssl.losses import DINOLoss
from ssl4sci.ssl.schedules import cosine_schedule, teacher_temperature

PRETRAIN_CFG = {
    "epochs": 3, "batch_size": 8, "base_lr": 0.0005, "min_lr": 1e-6, "warmup_epochs": 1, "weight_decay": 0.04,
    "weight_decay_end": 0.4, "momentum_teacher": 0.99, "out_dim": 64, "head_hidden_dim": 32, "head_bottleneck_dim": 16,
    "norm_last_layer": True, "teacher_temp": 0.04, "warmup_teacher_temp": 0.04, "warmup_teacher_temp_epochs": 0,
    "student_temp": 0.1, "center_momentum": 0.9, "freeze_last_layer_epochs": 1, "clip_grad": 3.0, "global_crop_size": 32,
    "global_crop_scale": [0.4, 1.0], "local_crop_size": 16, "local_crop_scale": [0.1, 0.4], "local_crops_number": 2,
    "noise_std": 0.05, "blur_prob": 0.3, "precision": "32-true", "num_workers": 0, "seed": 0, "max_steps": None,
}


def test_dino_loss_matches_hand_computation():
    loss_fn = DINOLoss(out_dim=2, student_temp=1.0)
    teacher = [torch.tensor([[0.0, math.log(3.0)]])]  # softmax at T=1 -> [0.25, 0.75]
    student = [torch.tensor([[5.0, 5.0]]), torch.tensor([[0.0, 0.0]])]  # view 0 skipped (same crop)
    loss = loss_fn(student, teacher, teacher_temp=1.0)
    # cross-entropy of [.25, .75] against uniform = ln 2
    assert loss.item() == pytest.approx(math.log(2.0), abs=1e-6)


def test_dino_loss_subtracts_the_centre_and_sharpens():
    loss_fn = DINOLoss(out_dim=2, student_temp=1.0)
    loss_fn.center.copy_(torch.tensor([[0.0, math.log(3.0)]]))
    teacher = [torch.tensor([[0.0, math.log(3.0)]])]  # centred -> [0, 0] -> uniform target
    student = [torch.zeros(1, 2), torch.tensor([[0.0, math.log(3.0)]])]
    loss = loss_fn(student, teacher, teacher_temp=1.0)
    expected = -0.5 * (math.log(0.25) + math.log(0.75))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_centre_is_an_ema_of_the_teacher_batch_mean():
    loss_fn = DINOLoss(out_dim=3, center_momentum=0.9)
    views = [torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 2.0, 1.0]])]
    loss_fn.update_center(views)
    assert torch.allclose(loss_fn.center, torch.tensor([[0.2, 0.2, 0.2]]))
    loss_fn.update_center(views)
    assert torch.allclose(loss_fn.center, torch.tensor([[0.38, 0.38, 0.38]]))


def test_cosine_schedule_endpoints_and_warmup():
    s = cosine_schedule(1.0, 0.1, total_steps=100, warmup_steps=10)
    assert len(s) == 100
    assert s[0] == 0.0 and s[10] == pytest.approx(1.0) and s[-1] == pytest.approx(0.1)
    assert np.all(np.diff(s[:10]) > 0) and np.all(np.diff(s[10:]) <= 1e-12)
    m = cosine_schedule(0.996, 1.0, 50)
    assert m[0] == pytest.approx(0.996) and m[-1] == pytest.approx(1.0)
    t = teacher_temperature(0.04, 0.07, warmup_epochs=3, epochs=5)
    assert list(np.round(t, 3)) == [0.04, 0.055, 0.07, 0.07, 0.07]


def test_head_output_and_frozen_weight_norm_gain():
    head = DINOHead(16, 32, hidden_dim=8, bottleneck_dim=4, norm_last_layer=True)
    out = head(torch.randn(5, 16))
    assert out.shape == (5, 32)
    assert not head.last_layer.parametrizations.weight.original0.requires_grad
    assert DINOHead(16, 32, 8, 4, norm_last_layer=False).last_layer.parametrizations.weight.original0.requires_grad


def test_multicrop_gives_two_global_and_n_local_views():
    views = MultiCrop(PRETRAIN_CFG)(torch.randn(1, 32, 32))
    assert [tuple(v.shape) for v in views] == [(1, 32, 32)] * 2 + [(1, 16, 16)] * 2


def test_training_lowers_the_loss_and_the_teacher_follows(prepared):
    """A few real optimisation steps on a fixed batch: the loss goes down and the teacher moves by EMA."""
    import pytorch_lightning as pl

    from ssl4sci.data import ImageDataset, PreparedData

    pl.seed_everything(0)
    data = PreparedData(prepared)
    ds = ImageDataset(data, data.rows(["train"]), transform=MultiCrop(PRETRAIN_CFG))
    batch = torch.utils.data.default_collate([ds[i] for i in range(8)])
    cfg = dict(PRETRAIN_CFG, freeze_last_layer_epochs=0, warmup_epochs=0, base_lr=0.01)
    module = DINO(cfg, MODEL_CFG, data.channels, data.image_size, steps_per_epoch=20, world_batch=8)
    opt = torch.optim.AdamW(module.student.parameters(), lr=1e-3)
    teacher_before = [p.clone() for p in module.teacher.parameters()]
    losses = []
    for _ in range(15):
        views, _ = batch
        with torch.no_grad():
            t = module.teacher(views[:2]).chunk(2)
        s = module.student(views).chunk(len(views))
        loss = module.loss_fn(list(s), list(t), 0.04)
        module.loss_fn.update_center(list(t))
        opt.zero_grad()
        loss.backward()
        opt.step()
        module.on_train_batch_end(None, None, 0)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    moved = sum((a - b).abs().sum().item() for a, b in zip(module.teacher.parameters(), teacher_before))
    assert moved > 0
