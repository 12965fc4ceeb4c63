"""DINO's view-level and EsViT's region-level losses against hand-computed cases, and on real backbone tokens.

The hand cases choose logits as temperature x log(weights) (+ centre), so every softmax is a known fraction and the
expected losses are written with math.log alone.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import region_loss_before, saved_bytes
from torch import nn

from ssl4sci.models import backbone_tokens, create_backbone
from ssl4sci.ssl.heads import DINOHead
from ssl4sci.ssl.losses import DINOLoss, RegionLoss, ema_center, match_tokens, soft_cross_entropy, student_log_probs


def ce(q: list[float], p: list[float]) -> float:
    """-sum q log p, by hand."""
    return -sum(qi * math.log(pi) for qi, pi in zip(q, p))


def logits(weights, temp: float, shift=0.0) -> torch.Tensor:
    """Logits whose softmax at ``temp`` is ``weights`` normalised (plus a shift softmax ignores, or a centre)."""
    return temp * torch.log(torch.tensor(weights, dtype=torch.float64)) + torch.as_tensor(shift, dtype=torch.float64)


# One thread: these tests are tiny, and two threads on a shared 2-core machine made one of them 50x slower.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- view level (DINO)

def test_soft_cross_entropy_by_hand():
    q = torch.tensor([[0.25, 0.75], [0.5, 0.5]], dtype=torch.float64)
    s = logits([[1, 3], [1, 1]], 0.5, shift=[[2.0], [-1.0]])  # softmax(s / 0.5) = [1/4, 3/4], [1/2, 1/2]
    expected = (ce([0.25, 0.75], [0.25, 0.75]) + ce([0.5, 0.5], [0.5, 0.5])) / 2
    assert soft_cross_entropy(q, student_log_probs(s, 0.5)).item() == pytest.approx(expected, abs=1e-12)


def test_dino_loss_two_global_one_local_by_hand():
    """B=2, K=3; teacher sees 2 global views, student 2 global + 1 local: pairs (T0,S1) (T0,S2) (T1,S0) (T1,S2)."""
    tt, st = 0.04, 0.1
    center = [[0.3, -0.2, 0.1]]
    loss_fn = DINOLoss(out_dim=3, student_temp=st, center_momentum=0.9).double()
    loss_fn.center.copy_(torch.tensor(center, dtype=torch.float64))
    q = {0: [[1 / 4, 1 / 4, 1 / 2], [3 / 8, 1 / 8, 1 / 2]], 1: [[1 / 4, 1 / 2, 1 / 4], [1 / 3, 1 / 3, 1 / 3]]}
    p = {0: [[1 / 2, 1 / 4, 1 / 4], [1 / 4, 1 / 4, 1 / 2]], 1: [[1 / 3, 1 / 3, 1 / 3], [1 / 8, 3 / 8, 1 / 2]],
         2: [[1 / 4, 1 / 2, 1 / 4], [1 / 2, 1 / 4, 1 / 4]]}
    teacher = [logits(q[t], tt, shift=center) for t in (0, 1)]  # centred: exactly tt * log q
    student = [logits(p[v], st, shift=[[5.0], [-3.0]]) for v in (0, 1, 2)]
    pair = lambda t, v: (ce(q[t][0], p[v][0]) + ce(q[t][1], p[v][1])) / 2  # noqa: E731 - mean over the 2 images
    expected = (pair(0, 1) + pair(0, 2) + pair(1, 0) + pair(1, 2)) / 4
    assert loss_fn(student, teacher, teacher_temp=tt).item() == pytest.approx(expected, abs=1e-9)


def test_dino_loss_is_ln_k_for_constant_outputs():
    k = 7
    loss_fn = DINOLoss(out_dim=k)
    teacher = [torch.full((4, k), 2.5) for _ in range(2)]
    student = [torch.full((4, k), -1.0) for _ in range(4)]
    assert loss_fn(student, teacher, teacher_temp=0.04).item() == pytest.approx(math.log(k), abs=1e-6)


def test_dino_centre_ema_one_step_after_another():
    loss_fn = DINOLoss(out_dim=2, center_momentum=0.5)
    loss_fn.update_center([torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[5.0, 6.0], [7.0, 8.0]])])
    assert torch.allclose(loss_fn.center, torch.tensor([[2.0, 2.5]]))  # 0.5 * 0 + 0.5 * mean [4, 5]
    loss_fn.update_center([torch.tensor([[0.0, 2.0], [0.0, 0.0]])])
    assert torch.allclose(loss_fn.center, torch.tensor([[1.0, 1.75]]))  # 0.5 * [2, 2.5] + 0.5 * [0, 1]


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


# ---------------------------------------------------------------- region level (EsViT)

def test_match_tokens_is_the_cosine_argmax_within_each_image():
    teacher = torch.tensor([[[10.0, 10.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
                            [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    student = torch.tensor([[[0.1, 1.0, 0.0], [1.0, 0.9, 0.0]],  # the dot product would pick token 0 for both
                            [[0.1, 1.0, 0.0], [1.0, 0.9, 0.0]]])  # same features, other image: other tokens
    index = match_tokens(student, teacher)
    assert index.dtype == torch.long and index.tolist() == [[1, 0], [2, 1]]


def region_case():
    """B=1, K=2, D=3. Teacher views T0, T1 with 2 tokens each; student views S0, S1 (2 tokens), S2 (local, 1 token).

    Matching by construction: S1 -> T0 crossed [1, 0]; S2 -> T0 [0]; S0 -> T1 in place [0, 1]; S2 -> T1 [1].
    """
    q = {0: [[1 / 4, 3 / 4], [1 / 2, 1 / 2]], 1: [[1 / 3, 2 / 3], [4 / 5, 1 / 5]]}
    p = {0: [[1 / 2, 1 / 2], [1 / 4, 3 / 4]], 1: [[2 / 3, 1 / 3], [1 / 5, 4 / 5]], 2: [[3 / 4, 1 / 4]]}
    t_feats = {0: [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], 1: [[0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]}
    s_feats = {0: [[0.0, 0.3, 2.0], [2.0, 1.5, 0.1]], 1: [[0.1, 2.0, 0.0], [3.0, 0.5, 0.0]], 2: [[1.0, 0.2, 0.1]]}
    expected_pairs = [
        (ce(q[0][1], p[1][0]) + ce(q[0][0], p[1][1])) / 2,  # (T0, S1), crossed
        ce(q[0][0], p[2][0]),  # (T0, S2)
        (ce(q[1][0], p[0][0]) + ce(q[1][1], p[0][1])) / 2,  # (T1, S0), in place
        ce(q[1][1], p[2][0]),  # (T1, S2)
    ]
    return q, p, t_feats, s_feats, sum(expected_pairs) / 4


def test_region_loss_by_hand():
    q, p, t_feats, s_feats, expected = region_case()
    tt, st, center = 0.07, 0.1, [[0.4, -0.3]]
    loss_fn = RegionLoss(out_dim=2, student_temp=st).double()
    loss_fn.center.copy_(torch.tensor(center, dtype=torch.float64))
    as_batch = lambda rows: torch.tensor(rows, dtype=torch.float64)[None]  # noqa: E731 - (1, N, .)
    assert match_tokens(as_batch(s_feats[1]), as_batch(t_feats[0])).tolist() == [[1, 0]]
    assert match_tokens(as_batch(s_feats[0]), as_batch(t_feats[1])).tolist() == [[0, 1]]
    assert match_tokens(as_batch(s_feats[2]), as_batch(t_feats[0])).tolist() == [[0]]
    assert match_tokens(as_batch(s_feats[2]), as_batch(t_feats[1])).tolist() == [[1]]
    targets = loss_fn.targets([logits(q[t], tt, shift=center)[None] for t in (0, 1)], teacher_temp=tt)
    loss = loss_fn([logits(p[v], st)[None] for v in (0, 1, 2)], [as_batch(s_feats[v]) for v in (0, 1, 2)],
                   targets, [as_batch(t_feats[t]) for t in (0, 1)])
    assert loss.item() == pytest.approx(expected, abs=1e-9)


def test_region_loss_gradients_reach_only_the_student():
    torch.manual_seed(0)
    b, k, d = 2, 5, 4
    s_proj = [torch.randn(b, n, k, requires_grad=True) for n in (9, 9, 4)]
    s_feats = [torch.randn(b, n, d, requires_grad=True) for n in (9, 9, 4)]
    t_proj = [torch.randn(b, 9, k, requires_grad=True) for _ in range(2)]
    t_feats = [torch.randn(b, 9, d, requires_grad=True) for _ in range(2)]
    loss_fn = RegionLoss(k)
    loss_fn(s_proj, s_feats, loss_fn.targets(t_proj, teacher_temp=0.04), t_feats).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in s_proj)
    assert all(t.grad is None for t in t_proj + t_feats + s_feats)  # targets detached, matching is an argmax


def test_region_loss_rejects_mismatched_views():
    x = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="pair"):
        RegionLoss(3)([x], [x], [x], [x])
    with pytest.raises(ValueError, match="student view 1"):
        RegionLoss(3)([x, torch.zeros(1, 3, 3)], [x, x], [x], [x])


def test_region_centre_ema_over_images_and_tokens():
    loss_fn = RegionLoss(out_dim=2, center_momentum=0.5)
    view0 = torch.tensor([[[1.0, 0.0], [3.0, 0.0]], [[5.0, 2.0], [7.0, 2.0]]])  # (B=2, M=2, K=2)
    view1 = torch.tensor([[[0.0, 4.0], [0.0, 4.0]], [[0.0, 4.0], [8.0, 4.0]]])
    loss_fn.update_center([view0, view1])  # mean over the 8 (image, token) rows: [3, 2.5]
    assert torch.allclose(loss_fn.center, torch.tensor([[1.5, 1.25]]))
    loss_fn.update_center([torch.full((3, 4, 2), 0.5)])
    assert torch.allclose(loss_fn.center, torch.tensor([[1.0, 0.875]]))


def test_region_centre_from_per_view_means_or_bf16_parts():
    """update_center takes each view's (1, K) mean (all EsViT's step keeps) as well as the views; bf16 parts are
    summed in fp32, as their fp32 copy would be."""
    views = [torch.randn(3, 4, 5), torch.randn(3, 4, 5)]
    full, means = RegionLoss(out_dim=5, center_momentum=0.5), RegionLoss(out_dim=5, center_momentum=0.5)
    full.update_center(views)
    means.update_center([v.mean(dim=(0, 1))[None] for v in views])
    torch.testing.assert_close(means.center, full.center)
    half = [v.bfloat16() for v in views]
    centre, expected = torch.zeros(1, 5), torch.zeros(1, 5)
    ema_center(centre, half, 0.5)
    ema_center(expected, torch.cat([v.float().reshape(-1, 5) for v in half]), 0.5)
    torch.testing.assert_close(centre, expected)


K = 16


def region_inputs(k: int):
    """float64, B=5: a student region head (its gain trainable) and tokens of 2 global (9 tokens) and 2 local
    (4 tokens) views; the teacher's logits and tokens on the 2 global views; a centre."""
    torch.manual_seed(0)
    head = DINOHead(6, k, hidden_dim=8, bottleneck_dim=4, norm_last_layer=False).double()
    s_tokens = [torch.randn(5, n, 6, dtype=torch.float64, requires_grad=True) for n in (9, 9, 4, 4)]
    t_tokens = [torch.randn(5, 9, 6, dtype=torch.float64) for _ in range(2)]
    t_logits = [torch.randn(5, 9, k, dtype=torch.float64) for _ in range(2)]
    return head, s_tokens, t_tokens, t_logits, torch.randn(1, k, dtype=torch.float64)


# 2^26: one piece per view; 20 K: a global view (45 K) in 3 pieces of 1-2 images, a local one (20 K) in 1; 1: an
# image per piece
@pytest.mark.parametrize("piece_elements", [2**26, 20 * K, 1], ids=["one_piece", "some_pieces", "image_pieces"])
@pytest.mark.parametrize("head_inside", [True, False], ids=["head_inside", "logits"])
def test_region_loss_in_pieces_equals_the_formula_on_all_views_at_once(piece_elements, head_inside):
    head, s_tokens, t_tokens, t_logits, center = region_inputs(K)
    tt, st = 0.04, 0.1
    expected = region_loss_before([head(t) for t in s_tokens], s_tokens, t_logits, t_tokens, center, tt, st)
    loss_fn = RegionLoss(K, student_temp=st).double()
    loss_fn.center.copy_(center)
    loss_fn.piece_elements = piece_elements
    targets = loss_fn.targets(t_logits, tt)
    if head_inside:
        loss = loss_fn(s_tokens, s_tokens, targets, t_tokens, head=head)
    else:
        loss = loss_fn([head(t) for t in s_tokens], s_tokens, targets, t_tokens)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    inputs = s_tokens + [p for p in head.parameters() if p.requires_grad]
    for got, want in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(expected, inputs)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


def test_region_loss_keeps_nothing_that_grows_with_out_dim_for_backward():
    """The student's side (a token projection, the region head, the loss) saves the same bytes at K = 16 and 1,024;
    the formula on all views at once saves at least every view's (B, N, K) log-probabilities. The targets, made
    without gradient, are saved by neither."""
    def saved(k: int, before: bool) -> int:
        head, s_tokens, t_tokens, t_logits, center = region_inputs(k)
        project = nn.Linear(6, 6).double()  # something the loss's input comes from, saved in both
        loss_fn = RegionLoss(k).double()
        targets = loss_fn.targets(t_logits, 0.04)
        if before:
            return saved_bytes(lambda: region_loss_before([head(project(t)) for t in s_tokens], s_tokens, t_logits,
                                                          t_tokens, center, 0.04, 0.1))[1]
        return saved_bytes(lambda: loss_fn([project(t) for t in s_tokens], s_tokens, targets, t_tokens, head=head))[1]

    assert saved(1024, before=False) == saved(K, before=False) > 0
    log_probs = 5 * (9 + 9 + 4 + 4) * (1024 - K) * 8  # float64
    assert saved(1024, before=True) - saved(K, before=True) >= log_probs


def test_soft_cross_entropy_keeps_its_value_and_gradient_without_a_negated_copy():
    torch.manual_seed(0)
    q = F.softmax(torch.randn(4, 7), dim=-1)
    s = torch.randn(4, 7, requires_grad=True)
    old, old_saved = saved_bytes(lambda: torch.sum(-q * student_log_probs(s, 0.1), dim=-1).mean(), existing=(q,))
    new, new_saved = saved_bytes(lambda: soft_cross_entropy(q, student_log_probs(s, 0.1)), existing=(q,))
    assert torch.equal(new, old)
    assert torch.equal(torch.autograd.grad(new, s)[0], torch.autograd.grad(old, s)[0])
    assert old_saved - new_saved == q.numel() * q.element_size()  # the product keeps q itself, not -q


@pytest.mark.parametrize("cfg,sizes", [
    ({"name": "vit_tiny_patch16_224", "patch_size": 8, "depth": 1, "drop_path_rate": 0.0}, (32, 32, 16)),
    ({"name": "swin_tiny_patch4_window7_224", "patch_size": 4, "drop_path_rate": 0.0, "window_size": 4,
      "embed_dim": 24, "depths": [2, 2], "num_heads": [2, 4]}, (64, 64, 32)),
], ids=["vit", "swin"])
def test_region_loss_on_backbone_tokens(cfg, sizes):
    """Two global crops and one local crop through a student and a frozen teacher: finite loss, student-only grads."""
    torch.manual_seed(0)
    img = sizes[0]
    student = create_backbone(cfg, in_chans=1, img_size=img)
    teacher = create_backbone(cfg, in_chans=1, img_size=img)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    dim = student.num_features
    s_head, t_head = nn.Linear(dim, 16), nn.Linear(dim, 16)
    t_head.load_state_dict(s_head.state_dict())
    t_head.requires_grad_(False)
    views = [torch.randn(2, 1, s, s) for s in sizes]
    s_tokens = [backbone_tokens(student, v)[1] for v in views]
    with torch.no_grad():
        t_tokens = [backbone_tokens(teacher, v)[1] for v in views[:2]]
    assert s_tokens[2].shape[1] * 4 == s_tokens[0].shape[1]  # the local crop has a quarter of the tokens
    loss_fn = RegionLoss(16)
    loss = loss_fn([s_head(t) for t in s_tokens], s_tokens, loss_fn.targets([t_head(t) for t in t_tokens], 0.04),
                   t_tokens)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert s_head.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in list(teacher.parameters()) + list(t_head.parameters()))


def test_koleo_is_minus_the_mean_log_nearest_neighbour_distance():
    from ssl4sci.ssl.losses import koleo_loss

    # Unit vectors at 0, 90 and 180 degrees: nearest-neighbour distances sqrt(2), sqrt(2), sqrt(2).
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert koleo_loss(x).item() == pytest.approx(-math.log(math.sqrt(2)), abs=1e-6)
    # Scale does not matter (features are normalised); a near-duplicate makes the loss large.
    assert koleo_loss(5 * x).item() == pytest.approx(koleo_loss(x).item(), abs=1e-6)
    crowded = torch.tensor([[1.0, 0.0], [1.0, 1e-3], [0.0, 1.0]])
    assert koleo_loss(crowded) > koleo_loss(x) + 3


def test_koleo_gradient_pushes_nearest_neighbours_apart():
    from ssl4sci.ssl.losses import koleo_loss

    x = torch.tensor([[1.0, 0.0], [0.995, 0.0998], [0.0, 1.0]], requires_grad=True)
    before = torch.dist(x[0].detach(), x[1].detach())
    torch.optim.SGD([x], lr=0.01).zero_grad()
    koleo_loss(x).backward()
    with torch.no_grad():
        moved = x - 0.01 * x.grad
    after = torch.dist(torch.nn.functional.normalize(moved[0], dim=0), torch.nn.functional.normalize(moved[1], dim=0))
    assert after > before
    with pytest.raises(ValueError, match="B >= 2"):
        koleo_loss(torch.ones(1, 4))
