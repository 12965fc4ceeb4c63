"""The collapse guard (ssl4sci.ssl.guard): teacher statistics, the head's collapse and the backbone's rank."""
import math

import pytest
import torch
from conftest import GUARD_CFG

from ssl4sci.ssl.guard import CollapseGuard, teacher_statistics


def test_teacher_statistics_tell_collapse_from_healthy_targets():
    k = 16
    uniform = [torch.zeros(8, k)]
    one_prototype = [torch.zeros(8, k).index_fill_(1, torch.tensor([3]), 50.0)]
    diverse = [torch.eye(k)[:8] * 50.0]
    centre = torch.zeros(1, k)
    h, kl = map(float, teacher_statistics(uniform, centre, 0.04))
    assert h == pytest.approx(math.log(k), abs=1e-5) and kl == pytest.approx(0.0, abs=1e-6)
    h, kl = map(float, teacher_statistics(one_prototype, centre, 0.04))
    assert h == pytest.approx(0.0, abs=1e-4) and kl == pytest.approx(0.0, abs=1e-4)
    h, kl = map(float, teacher_statistics(diverse, centre, 0.04))
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
