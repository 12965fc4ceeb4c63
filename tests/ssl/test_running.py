"""Running statistics on the training device (ssl4sci.ssl.running): sums, means, the first non-finite loss."""
import math

import pytest
import torch

from ssl4sci.ssl.guard import NonFiniteLoss
from ssl4sci.ssl.running import RunningStats


def _add(stats: RunningStats, loss: float, step: int, epoch: int = 0, crops: int = 10, rejects: int = 2) -> None:
    loss_t = torch.tensor(loss, dtype=torch.float32)
    stats.add({"train_loss": loss_t, "teacher_kl": torch.tensor(0.5), "crops": torch.tensor(crops),
               "crop_rejects": torch.tensor(rejects)}, loss_t, step, epoch)


def test_means_per_step_and_counts_summed():
    stats = RunningStats()
    for step, loss in enumerate([1.0, 2.0, 4.5]):
        _add(stats, loss, step)
    means = stats.means()
    assert means["train_loss"] == pytest.approx(2.5) and means["teacher_kl"] == pytest.approx(0.5)
    assert means["crops"] == 30 and means["crop_rejects"] == 6
    stats.check_finite("dino")  # all finite: no error


def test_the_first_non_finite_loss_is_named_with_its_step_and_epoch():
    stats = RunningStats()
    _add(stats, 1.0, 7, epoch=3)
    _add(stats, math.inf, 8, epoch=3)
    _add(stats, math.nan, 9, epoch=3)
    with pytest.raises(NonFiniteLoss, match=r"^dino loss is inf at step 8 \(epoch 3\)$"):
        stats.check_finite("dino")


def test_a_reduction_tells_every_process_about_another_ones_bad_loss():
    stats = RunningStats()
    _add(stats, 1.0, 0)
    stats.check_finite("esvit", reduce=lambda t: t)  # one finite process
    with pytest.raises(NonFiniteLoss, match="not finite on another process"):
        stats.check_finite("esvit", reduce=lambda t: t + 1)  # as if another rank had counted one


def test_state_round_trip_continues_the_sums():
    stats = RunningStats()
    _add(stats, 2.0, 0)
    restored = RunningStats()
    restored.load_state_dict(stats.state_dict(), torch.device("cpu"))
    _add(restored, 4.0, 1)
    assert restored.means()["train_loss"] == pytest.approx(3.0) and restored.steps == 2
    assert RunningStats().means() == {}
