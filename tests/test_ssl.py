import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import MODEL_CFG, PRETRAIN_CFG, SWIN_CFG, default_section

from ssl4sci.ssl.augment import MultiCrop
from ssl4sci.ssl.guard import CollapseGuard, NonFiniteLoss, TrainingCollapsed, teacher_statistics
from ssl4sci.ssl.heads import DINOHead
from ssl4sci.ssl.losses import DINOLoss
from ssl4sci.ssl.monitor import KNNMonitor
from ssl4sci.ssl.schedules import cosine_schedule, teacher_temperature

GUARD_CFG = default_section("pretrain")["guard"]


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


def _batch(data, n=8, seed=0):
    from ssl4sci.data import ImageDataset

    torch.manual_seed(seed)
    crop = MultiCrop(PRETRAIN_CFG, data.stats["mean"], data.stats["std"], "lensing")
    ds = ImageDataset(data, data.rows(["train"]), transform=crop, raw=True)
    return torch.utils.data.default_collate([ds[i] for i in range(n)])


def test_pretraining_views_start_from_the_stored_pixels_and_end_normalised(prepared):
    """``raw=True`` hands the multi-crop the stored values; each view is normalised with the dataset's statistics
    as the last step, so a whole-image view is the normalised image up to a symmetry."""
    from ssl4sci.data import ImageDataset, PreparedData

    data = PreparedData(prepared)
    rows = data.rows(["train"])
    stored = data.raw_image(int(rows["shard"].iloc[0]), int(rows["index"].iloc[0]))
    assert torch.equal(ImageDataset(data, rows, raw=True)[0][0], stored)
    assert torch.equal(ImageDataset(data, rows)[0][0], data.normalise(stored))
    cfg = dict(PRETRAIN_CFG, global_crop_size=data.image_size, global_crop_scale=[1.0, 1.0],
               augment={**PRETRAIN_CFG["augment"], "noise_std": 0.0, "blur_prob": 0.0})
    crop = MultiCrop(cfg, data.stats["mean"], data.stats["std"], "lensing")
    view = ImageDataset(data, rows, transform=crop, raw=True)[0][0]["views"][0]
    normalised = data.normalise(stored)
    dihedral = [torch.rot90(f, k, dims=(-2, -1)) for f in (normalised, normalised.flip(-1)) for k in range(4)]
    assert any(torch.equal(view, d) for d in dihedral)


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


def test_koleo_term_is_added_to_the_view_loss_and_logged(prepared):
    from ssl4sci.data import PreparedData
    from ssl4sci.pretrain import method_class
    from ssl4sci.ssl.losses import koleo_loss

    torch.manual_seed(0)
    data = PreparedData(prepared)
    crops, _ = _batch(data)
    module = method_class("dino")(dict(PRETRAIN_CFG, koleo_weight=0.3), MODEL_CFG, data.channels, data.image_size,
                                  steps_per_epoch=20, world_batch=8)
    step = module.compute_loss(crops["views"], teacher_temp=0.04)
    assert set(step.parts) == {"view_loss", "koleo_loss"}
    assert step.loss.item() == pytest.approx(step.parts["view_loss"].item() + 0.3 * step.parts["koleo_loss"].item(),
                                             rel=1e-5)
    pooled = [module.student.backbone(v) for v in crops["views"][:2]]
    expected = (koleo_loss(pooled[0]) + koleo_loss(pooled[1])) / 2
    assert step.parts["koleo_loss"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_teacher_statistics_tell_collapse_from_healthy_targets():
    k = 16
    uniform = [torch.zeros(8, k)]
    one_prototype = [torch.zeros(8, k).index_fill_(1, torch.tensor([3]), 50.0)]
    diverse = [torch.eye(k)[:8] * 50.0]
    centre = torch.zeros(1, k)
    h, kl = teacher_statistics(uniform, centre, 0.04)
    assert h == pytest.approx(math.log(k), abs=1e-5) and kl == pytest.approx(0.0, abs=1e-6)
    h, kl = teacher_statistics(one_prototype, centre, 0.04)
    assert h == pytest.approx(0.0, abs=1e-4) and kl == pytest.approx(0.0, abs=1e-4)
    h, kl = teacher_statistics(diverse, centre, 0.04)
    assert h == pytest.approx(0.0, abs=1e-4) and kl == pytest.approx(math.log(8), abs=1e-3)  # 8 distinct one-hots


def test_collapse_guard_waits_for_warmup_and_patience():
    guard = CollapseGuard(out_dim=64, cfg={**GUARD_CFG, "patience_epochs": 2, "start_epoch": None,
                                           "loss_tolerance": 0.005, "min_teacher_kl": 1e-3}, warmup_epochs=2)
    ln_k = math.log(64)
    flat = {"train_loss": ln_k, "teacher_kl": 0.5, "teacher_entropy": 3.0}
    healthy = {"train_loss": 0.8 * ln_k, "teacher_kl": 0.5, "teacher_entropy": 3.0}
    assert guard.check({"epoch": 0, **flat}) is None and guard.check({"epoch": 1, **flat}) is None  # warm-up
    assert guard.check({"epoch": 2, **flat}) is None  # first collapsed epoch: patience 2
    assert guard.check({"epoch": 3, **healthy}) is None  # a healthy epoch resets the streak
    assert guard.check({"epoch": 4, **flat}) is None
    message = guard.check({"epoch": 5, **flat})
    assert "collapsed at epoch 5" in message and "ln(out_dim)" in message and "pretrain.base_lr" in message
    dominated = {"epoch": 9, "train_loss": 0.5, "teacher_kl": 1e-5, "teacher_entropy": 0.01}
    guard.streak = 1
    assert "one prototype dominates" in guard.check(dominated)


def _rank_guard(action, warnings, **overrides):
    cfg = {**GUARD_CFG, "patience_epochs": 2, "start_epoch": None, "rank_action": action, "min_rank_ratio": 0.5,
           **overrides}
    return CollapseGuard(out_dim=64, cfg=cfg, warmup_epochs=2, warn=warnings.append)


def _rank_row(epoch, rank, initial=80.0):
    """A healthy head (loss below ln K, teacher KL well above its floor) with a measured backbone rank (or NaN)."""
    return {"epoch": epoch, "train_loss": 2.0, "teacher_kl": 0.5, "teacher_entropy": 3.0, "effective_rank": rank,
            "effective_rank_init": initial}


def test_rank_guard_warns_once_after_patience_on_monitored_epochs():
    warnings = []
    guard = _rank_guard("warn", warnings)
    assert guard.check(_rank_row(1, 5.0)) is None and not warnings  # warm-up: not checked
    assert guard.check(_rank_row(2, 30.0)) is None  # first monitored epoch below half of 80
    assert guard.check(_rank_row(3, math.nan)) is None  # not monitored: the streak neither grows nor resets
    assert guard.check(_rank_row(4, 20.0)) is None and len(warnings) == 1  # second in a row: one warning
    message = warnings[0]
    assert "\n" not in message and "dimensional collapse at epoch 4" in message
    assert "effective rank 20.0" in message and "untrained network's 80.0" in message and "0.25 x" in message
    assert "pretrain.base_lr" in message and "pretrain.guard.rank_action" in message
    assert guard.check(_rank_row(5, 10.0)) is None and len(warnings) == 1  # still collapsed: no second line
    assert guard.check(_rank_row(6, 60.0)) is None  # recovered: the streak resets
    guard.check(_rank_row(7, 10.0)), guard.check(_rank_row(8, 10.0))
    assert len(warnings) == 2 and "epoch 8" in warnings[1]


def test_rank_guard_stops_with_one_line_or_stays_silent_when_ignored():
    warnings = []
    stop = _rank_guard("stop", warnings)
    assert stop.check(_rank_row(2, 39.0)) is None
    message = stop.check(_rank_row(3, 39.0))
    assert message.startswith("dimensional collapse at epoch 3 (2 monitored epochs in a row)") and "\n" not in message
    assert "(pretrain.guard.min_rank_ratio = 0.5)" in message and not warnings
    stop.load_state_dict({"streak": 0})  # a checkpoint from before this check: the rank streak starts at 0
    assert stop.rank_streak == 0 and stop.state_dict() == {"streak": 0, "rank_streak": 0}
    assert stop.check(_rank_row(4, 41.0)) is None and stop.check(_rank_row(5, 41.0)) is None  # above half: healthy
    assert stop.check(_rank_row(6, 10.0, initial=math.nan)) is None  # no untrained reference: not checked
    ignored = _rank_guard("ignore", warnings, start_epoch=0)
    assert all(ignored.check(_rank_row(e, 1.0)) is None for e in range(5)) and not warnings
    head_first = _rank_guard("stop", warnings, start_epoch=0)
    flat = {**_rank_row(0, 1.0), "train_loss": math.log(64)}
    head_first.check(flat)
    assert "ln(out_dim)" in head_first.check({**flat, "epoch": 1})  # the head's collapse is named first


def test_pretraining_records_the_effective_rank_per_monitored_epoch(prepared, tmp_path):
    """A tiny real run: the untrained network's rank before training, the rank and PC1 share on monitored epochs
    (NaN on the others) in metrics.csv and the checkpoint; the loss plot has its rank panel."""
    _run_pretrain(prepared, tmp_path, epochs=2)
    history = pd.read_csv(tmp_path / "metrics.csv")
    assert {"effective_rank", "pc1_share", "effective_rank_init"} <= set(history.columns)
    assert history["effective_rank"].isna().tolist() == [True, False]  # monitor.every_epochs = 2
    last = history.iloc[-1]
    from ssl4sci.data import PreparedData

    n_train = len(PreparedData(prepared).rows(["train"]))  # n centred images span at most n - 1 directions
    assert 1.0 < last["effective_rank"] <= n_train - 1 and 0.0 < last["pc1_share"] < 1.0
    initial = history["effective_rank_init"]
    assert initial.nunique() == 1 and 1.0 < initial.iloc[0] <= n_train - 1
    assert torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)["initial_rank"] == initial.iloc[0]
    assert (tmp_path / "loss.png").stat().st_size > 0


def _run_pretrain(prepared, out, **overrides):
    from ssl4sci.pretrain import pretrain

    return pretrain(prepared, out, "dino", dict(PRETRAIN_CFG, **overrides), MODEL_CFG, device="cpu", threads=2,
                    progress=False)


def test_collapsed_training_stops_with_one_line_and_keeps_the_last_checkpoint(prepared, tmp_path):
    """A teacher temperature of 50 makes every target uniform: the guard stops the run after its patience."""
    guard = {**GUARD_CFG, "enabled": True, "patience_epochs": 2, "start_epoch": 0, "loss_tolerance": 0.005,
             "min_teacher_kl": 1e-3}
    with pytest.raises(TrainingCollapsed) as err:
        _run_pretrain(prepared, tmp_path, epochs=6, teacher_temp=50.0, warmup_teacher_temp=50.0, guard=guard)
    message = str(err.value)
    assert "\n" not in message and "collapsed at epoch 1" in message and "same teacher distribution" in message
    kept = list((tmp_path / "work").glob("*/last.ckpt"))
    assert len(kept) == 1 and str(kept[0]) in message
    assert torch.load(kept[0], map_location="cpu", weights_only=False)["epoch"] == 0  # the epoch before the stop
    assert not (tmp_path / "last.ckpt").exists() and not (tmp_path / "metrics.csv").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(prepared, tmp_path):
    """An absurd learning rate, reached in the second step of a 3-epoch warm-up, blows the weights up; the next
    forward pass is non-finite and training stops, keeping epoch 0's checkpoint."""
    with pytest.raises(NonFiniteLoss) as err:
        _run_pretrain(prepared, tmp_path, epochs=4, warmup_epochs=3, base_lr=1e32, clip_grad=0.0, weight_decay=0.0,
                      weight_decay_end=0.0)
    message = str(err.value)
    assert "loss is nan" in message.lower() or "loss is inf" in message.lower()
    kept = list((tmp_path / "work").glob("*/last.ckpt"))
    assert len(kept) == 1 and str(kept[0]) in message
    state = torch.load(kept[0], map_location="cpu", weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["teacher_backbone"].values())


def test_monitor_scores_the_same_knn_as_the_evaluate_stage(prepared, tmp_path):
    from ssl4sci.data import PreparedData
    from ssl4sci.embed import embed
    from ssl4sci.evaluate import evaluate
    from ssl4sci.models import create_backbone

    data = PreparedData(prepared)
    monitor = KNNMonitor(data, dict(PRETRAIN_CFG["monitor"], k=5), batch_size=7)
    assert [e for e in range(5) if monitor.due(e, 5)] == [1, 3, 4]
    no_val = PreparedData(prepared)
    no_val.manifest = no_val.manifest.assign(split=no_val.manifest["split"].replace("val", "train"))
    rank_only = KNNMonitor(no_val, PRETRAIN_CFG["monitor"], batch_size=7)  # no val split: k-NN off, no crash
    assert [e for e in range(5) if rank_only.due(e, 5)] == [1, 3, 4] and not rank_only.knn
    torch.manual_seed(0)
    backbone = create_backbone(MODEL_CFG, data.channels, data.image_size, drop_path_rate=0.0)
    without_val = rank_only.measure(backbone, torch.device("cpu"))
    assert math.isnan(without_val["knn_val"]) and without_val["effective_rank"] > 1
    online = monitor.measure(backbone, torch.device("cpu"))
    assert backbone.training  # the monitor restores the mode it found
    path = embed(prepared, tmp_path / "r.parquet", "random_init", None, {"batch_size": 8, "seed": 0}, MODEL_CFG,
                 device="cpu")
    knn_cfg = default_section("evaluate", knn_k=5, knn_temperature=PRETRAIN_CFG["monitor"]["temperature"],
                              fit_splits=["train"], score_split="val")
    offline = evaluate(path, "knn", knn_cfg, tmp_path / "knn.json")
    assert online["knn_val"] == pytest.approx(offline["metrics"]["top1"])
    # the monitor's subset is the whole (small) train split: the same spectrum as the evaluate stage's protocol
    spectrum_cfg = default_section("evaluate", fit_splits=["train"])
    spectrum = evaluate(path, "spectrum", spectrum_cfg, tmp_path / "spectrum.json")["metrics"]
    assert online["effective_rank"] == pytest.approx(spectrum["effective_rank"], rel=1e-4)
    assert online["pc1_share"] == pytest.approx(spectrum["pc1_share"], rel=1e-4)


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
