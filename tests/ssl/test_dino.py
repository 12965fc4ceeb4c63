"""DINO (ssl4sci.ssl.dino): the KoLeo term on the student's backbone features."""
import pytest
import torch
from conftest import MODEL_CFG, PRETRAIN_CFG, _batch


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
