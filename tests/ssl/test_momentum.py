"""The momentum-teacher machinery DINO and EsViT share (ssl4sci.ssl.momentum): real steps lower the loss and move the
teacher by EMA; a resumed run continues every schedule where it stopped."""
import numpy as np
import pytest
import torch
from conftest import MODEL_CFG, PRETRAIN_CFG, SWIN_CFG, _batch

from ssl4sci.ssl.augment import MultiCrop

CNN_CFG = {"name": "test_resnet", "drop_path_rate": 0.0}


@pytest.mark.parametrize("method, model", [("dino", "vit"), ("esvit", "swin"), ("esvit", "vit"), ("dino", "cnn"),
                                           ("esvit", "cnn")])
def test_training_lowers_the_loss_and_the_teacher_follows(prepared, method, model):
    """Real optimisation steps on a fixed batch: the loss goes down, the teacher moves by EMA, the centres move."""
    import pytorch_lightning as pl

    from ssl4sci.data import PreparedData
    from ssl4sci.pretrain import method_class

    pl.seed_everything(0)
    data = PreparedData(prepared)
    crops, _ = _batch(data)
    cfg = dict(PRETRAIN_CFG, freeze_last_layer_epochs=0, warmup_epochs=0)
    model_cfg = {"swin": SWIN_CFG, "vit": MODEL_CFG, "cnn": CNN_CFG}[model]
    module = method_class(method)(cfg, model_cfg, data.channels, data.image_size, steps_per_epoch=20, world_batch=8)
    opt = torch.optim.AdamW(module.student.parameters(), lr=1e-3)
    teacher_before = [p.clone() for p in module.teacher.parameters()]
    losses = []
    for _ in range(12):
        step = module.compute_loss(crops["views"], teacher_temp=0.04)
        module.update_centers(step)
        opt.zero_grad()
        step.loss.backward()
        opt.step()
        module.on_train_batch_end(None, None, 0)
        losses.append(step.loss.item())
    assert losses[-1] < losses[0]
    moved = sum((a - b).abs().sum().item() for a, b in zip(module.teacher.parameters(), teacher_before))
    assert moved > 0
    assert module.view_loss.center.abs().sum() > 0
    if method == "esvit":
        assert set(step.parts) == {"view_loss", "region_loss"}
        w = cfg["esvit"]["region_weight"]
        mixed = (1 - w) * step.parts["view_loss"].item() + w * step.parts["region_loss"].item()
        assert step.loss.item() == pytest.approx(mixed, rel=1e-5)
        assert module.region_loss.center.abs().sum() > 0


def test_the_teacher_moves_by_ema_of_every_student_parameter(prepared):
    """teacher <- m teacher + (1 - m) student for every parameter (one foreach op over all of them), with m the
    momentum schedule's value at the step."""
    from ssl4sci.data import PreparedData
    from ssl4sci.pretrain import method_class

    torch.manual_seed(0)
    data = PreparedData(prepared)
    module = method_class("dino")(PRETRAIN_CFG, MODEL_CFG, data.channels, data.image_size, steps_per_epoch=4,
                                  world_batch=8)
    with torch.no_grad():
        for p in module.student.parameters():
            p.add_(torch.randn_like(p))
    teacher = [p.clone() for p in module.teacher.parameters()]
    student = [p.clone() for p in module.student.parameters()]
    module.on_train_batch_end(None, None, 0)
    m = float(module.momentum_schedule[0])
    assert 0.9 < m < 1
    for after, t, s in zip(module.teacher.parameters(), teacher, student):
        assert torch.allclose(after, m * t + (1 - m) * s, atol=1e-6)
    assert all(torch.equal(p, s) for p, s in zip(module.student.parameters(), student))


def test_resume_continues_the_schedules_where_they_stopped(prepared, tmp_path):
    """Two epochs, a checkpoint, two more: the optimiser sees exactly the learning rates and weight decays, and the
    teacher exactly the momenta and temperatures, of one uninterrupted four-epoch run."""
    import pytorch_lightning as pl

    from ssl4sci.data import ImageDataset, PreparedData
    from ssl4sci.ssl.dino import DINO

    class Record(pl.Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            group = trainer.optimizers[0].param_groups[0]
            self.seen.append((trainer.global_step, group["lr"], group["weight_decay"]))

    data = PreparedData(prepared)
    cfg = dict(PRETRAIN_CFG, epochs=4, warmup_epochs=1, warmup_teacher_temp=0.02, warmup_teacher_temp_epochs=3)
    crop = MultiCrop(cfg, data.stats["mean"], data.stats["std"], "lensing")
    dataset = ImageDataset(data, data.rows(["train"]), transform=crop, raw=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, drop_last=True)

    def fit(max_epochs, ckpt=None):
        record = Record()
        module = DINO(cfg, MODEL_CFG, data.channels, data.image_size, steps_per_epoch=len(loader), world_batch=8)
        trainer = pl.Trainer(max_epochs=max_epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[record], accelerator="cpu",
                             default_root_dir=tmp_path)
        trainer.fit(module, loader, ckpt_path=ckpt)
        return trainer, module, record.seen

    trainer, _, first = fit(2)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    _, resumed, second = fit(4, tmp_path / "half.ckpt")
    _, straight, whole = fit(4)
    assert [s for s, *_ in first + second] == [s for s, *_ in whole] == list(range(1, 4 * len(loader) + 1))
    assert np.allclose([v for _, *v in first + second], [v for _, *v in whole])
    keys = ["epoch", "step", "lr", "weight_decay", "momentum_teacher", "teacher_temp"]
    assert [[row[k] for k in keys] for row in resumed.history] == [[row[k] for k in keys] for row in straight.history]
    assert [row["teacher_temp"] for row in straight.history] == pytest.approx([0.02, 0.03, 0.04, 0.04])
