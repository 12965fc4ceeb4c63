"""EsViT (ssl4sci.ssl.esvit): a region head on both networks, and ``esvit.region_weight`` mixing the two losses."""
import pytest
import torch
from conftest import MODEL_CFG, PRETRAIN_CFG

from ssl4sci.ssl.esvit import EsViT


def random_views(batch: int = 2) -> list[torch.Tensor]:
    """Two global 32 px and two local 16 px views of a one-channel batch."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, 1, size, size, generator=g) for size in (32, 32, 16, 16)]


@pytest.mark.parametrize("weight, alone", [(0.0, "view_loss"), (1.0, "region_loss")])
def test_region_weight_picks_one_loss_at_either_end_and_both_centres_move(weight, alone):
    torch.manual_seed(0)
    cfg = dict(PRETRAIN_CFG, esvit={**PRETRAIN_CFG["esvit"], "region_weight": weight})
    module = EsViT(cfg, MODEL_CFG, 1, 32, steps_per_epoch=1, world_batch=2)
    assert module.student.region_head is not None and module.teacher.region_head is not None
    step = module.compute_loss(random_views(), teacher_temp=0.04)
    assert set(step.parts) == {"view_loss", "region_loss"}
    assert step.loss.item() == pytest.approx(step.parts[alone].item(), rel=1e-6)
    module.update_centers(step)
    assert module.view_loss.center.abs().sum() > 0 and module.region_loss.center.abs().sum() > 0
