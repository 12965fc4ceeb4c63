"""EsViT (ssl4sci.ssl.esvit): a region head on both networks, and ``esvit.region_weight`` mixing the two losses."""
import pytest
import torch
from conftest import MODEL_CFG, PRETRAIN_CFG, SWIN_CFG, region_loss_before, saved_bytes

from ssl4sci.ssl.dino import DINO
from ssl4sci.ssl.esvit import EsViT


def random_views(batch: int = 2, size: int = 32) -> list[torch.Tensor]:
    """Two global ``size`` px and two local ``size / 2`` px views of a one-channel batch."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, 1, s, s, generator=g) for s in (size, size, size // 2, size // 2)]


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


@pytest.mark.parametrize("model_cfg, size", [(MODEL_CFG, 32), (SWIN_CFG, 64)], ids=["vit", "swin"])
def test_step_equals_the_region_formula_on_every_tokens_logits(model_cfg, size):
    """compute_loss (teacher targets made up front, the student's region head inside the loss, in pieces) equals
    the step as it was: the student's region logits of every token at once and the formula on them, in value and in
    the gradient of every trainable student parameter."""
    torch.manual_seed(0)
    module = EsViT(PRETRAIN_CFG, model_cfg, 1, size, steps_per_epoch=1, world_batch=2).double()
    for loss in (module.view_loss, module.region_loss):
        loss.center.normal_()
    module.region_loss.piece_elements = 40  # an image per piece, even at this size
    views = [v.double() for v in random_views(size=size)]
    step = module.compute_loss(views, teacher_temp=0.04)
    with torch.no_grad():
        teacher = module.teacher(views[:2])
    student = module.student(views)
    w = PRETRAIN_CFG["esvit"]["region_weight"]
    region = region_loss_before(student.region_proj, student.tokens, teacher.region_proj, teacher.tokens,
                                module.region_loss.center, 0.04, module.region_loss.student_temp)
    expected = (1 - w) * module.view_loss(student.proj, teacher.proj, 0.04) + w * region
    assert step.loss.item() == pytest.approx(expected.item(), rel=1e-10)
    params = [p for p in module.student.parameters() if p.requires_grad]
    for got, want in zip(torch.autograd.grad(step.loss, params), torch.autograd.grad(expected, params)):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)
    # the centre moves by the teacher's mean region output, which the step keeps per view
    centre = module.region_loss.center.clone()
    module.update_centers(step)
    m = module.region_loss.center_momentum
    mean = torch.cat([t.reshape(-1, t.shape[-1]) for t in teacher.region_proj]).mean(dim=0, keepdim=True)
    torch.testing.assert_close(module.region_loss.center, m * centre + (1 - m) * mean)


def test_region_loss_adds_nothing_that_grows_with_out_dim_to_what_backward_keeps():
    """From out_dim 64 to 1,024 the bytes autograd saves in an EsViT step grow exactly as in a DINO step with the
    same backbone and view head: only the view-level loss's do."""
    def growth(method) -> int:
        saved = []
        for out_dim in (64, 1024):
            torch.manual_seed(0)
            module = method(dict(PRETRAIN_CFG, out_dim=out_dim), MODEL_CFG, 1, 32, steps_per_epoch=1, world_batch=2)
            saved.append(saved_bytes(lambda: module.compute_loss(random_views(), teacher_temp=0.04).loss)[1])
        return saved[1] - saved[0]

    assert growth(EsViT) == growth(DINO) > 0
