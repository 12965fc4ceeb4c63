"""Content-aware crops (ssl4sci.ssl.crops): the signal mask, box scoring and sampling, rejection, on small synthetic
images."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import SIZE, SQUARE, corner_image, default_section, make_crop

from ssl4sci.ssl.crops import SignalMap, crop_boxes, sample_boxes, signal_mask


def truth_fraction(box) -> float:
    """Share of the box inside the known bright square, computed from geometry alone."""
    top, left, h, w = box
    rows = max(0, min(top + h, SQUARE) - top)
    cols = max(0, min(left + w, SQUARE) - left)
    return rows * cols / (h * w)


SIGMA = default_section("pretrain")["augment"]["signal_sigma"]


# --- signal mask -------------------------------------------------------------------------------

def test_signal_mask_finds_the_bright_square_on_noisy_sky():
    mask = signal_mask(corner_image(), sigma=5.0)
    expected = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    expected[:SQUARE, :SQUARE] = True
    assert mask.dtype == torch.bool and torch.equal(mask, expected)


def test_signal_mask_of_clean_and_constant_images():
    # Exact-zero sky (MAD 0): the floor relative to the dynamic range still gives the object.
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    ring = torch.exp(-((torch.hypot(yy - 16, xx - 16) - 8) ** 2) / 2.0)
    clean = torch.where(ring > 1e-4, ring, torch.zeros(()))[None]
    mask = signal_mask(clean, SIGMA)
    assert mask[16, 24] and mask[8, 16] and not mask[16, 16] and not mask[0, 0]
    assert 0.05 < mask.float().mean() < 0.5
    assert not signal_mask(torch.full((2, 16, 16), 3.0), SIGMA).any()
    # Any channel counts: signal only in channel 1 is found.
    two = torch.zeros(2, 16, 16)
    two[1, 4:8, 4:8] = 1.0
    assert signal_mask(two, SIGMA).sum() == 16


# --- box scoring and sampling ------------------------------------------------------------------

def test_vectorised_box_fractions_equal_a_loop_over_boxes():
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(23, 31, generator=g) > 0.7
    boxes = sample_boxes(300, 23, 31, (0.01, 1.0), generator=g)
    got = SignalMap(mask).fractions(boxes)
    want = torch.tensor([mask[top:top + h, left:left + w].sum().item() / (h * w) for top, left, h, w in boxes.tolist()],
                        dtype=torch.float32)
    assert torch.equal(got, want)
    whole = torch.tensor([[0, 0, 23, 31]])
    assert SignalMap(mask).fractions(whole).item() == pytest.approx(mask.float().mean().item())


def test_batched_masks_and_fractions_equal_image_by_image():
    """A batch's masks, tables and box scores are each image's own: no image leaks into another's."""
    images = torch.stack([corner_image(seed=s) for s in range(3)])
    images[1] = images[1].flip(-1)  # the square in another corner
    images[2] = 0.05 * torch.randn(1, SIZE, SIZE)  # no object at all
    batch = SignalMap.from_image(images, sigma=5.0)
    boxes = sample_boxes(3 * 40, SIZE, SIZE, (0.02, 0.3)).view(3, 40, 4)
    got = batch.fractions(boxes)
    for i, image in enumerate(images):
        single = SignalMap.from_image(image, sigma=5.0)
        assert torch.equal(batch.mask[i], single.mask)
        assert torch.equal(got[i], single.fractions(boxes[i]))
    assert got[2].max() < 0.05 and got[0].max() > 0.3 and got[1].max() > 0.3


@pytest.mark.parametrize("height,width", [(64, 64), (33, 47), (10, 7)])
def test_sampled_boxes_lie_inside_and_follow_the_scale(height, width):
    boxes = sample_boxes(2000, height, width, (0.1, 0.5))
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    assert (h >= 1).all() and (w >= 1).all()
    area = (h * w).double() / (height * width)
    assert 0.08 < area.min() and area.max() < 0.52  # uniform in [0.1, 0.5] up to the rounding of the sides
    assert area.mean().item() == pytest.approx(0.3, abs=0.01)
    assert len(set(top.tolist())) > 1 and len(set(left.tolist())) > 1
    full = sample_boxes(50, height, width, (1.0, 1.0))
    assert (full == torch.tensor([0, 0, height, width])).all()  # scale 1: the ratio bends, the box is the image


@pytest.mark.parametrize("height,width", [(64, 64), (33, 47), (16, 9)])
def test_keep_centre_boxes_contain_the_centre_pixel(height, width):
    cy, cx = height // 2, width // 2
    top, left, h, w = sample_boxes(3000, height, width, (0.01, 0.3), keep_centre=True).unbind(1)
    assert ((top <= cy) & (cy < top + h) & (left <= cx) & (cx < left + w)).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    # ... and still wander: the centre is not always at the same place in the box.
    assert len(set((cy - top).tolist())) > 3 and len(set((cx - left).tolist())) > 3
    crop = make_crop(8, (0.01, 0.3), min_signal_fraction=0.5, keep_centre=True)
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[:3, :3] = True  # signal far from the centre must not pull boxes off it
    for _ in range(200):
        (top, left, bh, bw), _ = crop.select(SignalMap(mask))
        assert top <= cy < top + bh and left <= cx < left + bw


# --- rejection ---------------------------------------------------------------------------------

def test_rejection_keeps_only_crops_on_the_signal():
    torch.manual_seed(0)
    signal = SignalMap.from_image(corner_image(), sigma=5.0)
    threshold, draws = 0.25, 400
    picky = make_crop(8, (0.02, 0.1), min_signal_fraction=threshold, max_tries=50)
    picked = [picky.select(signal) for _ in range(draws)]
    accepted = [box for box, rejected in picked if rejected < picky.max_tries - 1]  # max_tries - 1: maybe a fallback
    assert len(accepted) > 0.9 * draws
    assert all(truth_fraction(box) >= threshold for box in accepted)
    assert sum(rejected for _, rejected in picked) > draws  # most first candidates miss the corner

    blind = make_crop(8, (0.02, 0.1), min_signal_fraction=0.0, max_tries=50)
    taken = [blind.select(signal) for _ in range(draws)]
    assert all(rejected == 0 for _, rejected in taken)
    blank = sum(truth_fraction(box) == 0 for box, _ in taken)
    assert blank > 0.5 * draws


def test_when_no_candidate_qualifies_the_best_is_used_and_the_others_count_as_rejected():
    torch.manual_seed(0)
    mask = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    mask[:SQUARE, :SQUARE] = True
    crop = make_crop(8, (0.02, 0.1), min_signal_fraction=1.0, max_tries=5)
    none_passed = 0
    for _ in range(100):
        state = torch.get_rng_state()
        box, rejected = crop.select(SignalMap(mask))
        torch.set_rng_state(state)
        candidates = sample_boxes(5, SIZE, SIZE, crop.scale, crop.ratio)
        fractions = [truth_fraction(b) for b in candidates.tolist()]
        if max(fractions) < 1.0:
            none_passed += 1
            assert rejected == 4 and list(box) == candidates[fractions.index(max(fractions))].tolist()
        else:
            assert rejected == fractions.index(1.0) and list(box) == candidates[rejected].tolist()
    assert 10 < none_passed < 100


def test_crops_without_zoom_keep_the_pixel_scale():
    """zoom=False: every box is size x size at the image's own scale, only its position varies, and the view is the
    box's pixels unresampled (lensing: the Einstein radius in pixels is physics)."""
    top, left, h, w = sample_boxes(500, 40, 40, (0.1, 0.2), keep_centre=True, side=24).unbind(1)
    assert (h == 24).all() and (w == 24).all() and len(set(top.tolist())) > 3
    assert ((top <= 20) & (20 < top + 24) & (left <= 20) & (20 < left + 24)).all()
    img = torch.randn(2, 40, 40)
    crop = make_crop(24, (0.1, 0.2), min_signal_fraction=0.0, keep_centre=True, zoom=False)
    torch.manual_seed(0)
    (top, left, bh, bw), _ = crop.select(SignalMap(torch.ones(40, 40, dtype=torch.bool)))
    torch.manual_seed(0)
    view, _ = crop(img[None], torch.ones(40, 40, dtype=torch.bool))
    assert (bh, bw) == (24, 24) and torch.equal(view[0, 0], img[:, top:top + 24, left:left + 24])


def test_crop_returns_the_resized_selected_box():
    img = torch.randn(3, 40, 40)
    crop = make_crop(16, (0.1, 0.5), min_signal_fraction=0.0)
    torch.manual_seed(3)
    boxes, _ = crop.select_boxes(SignalMap(torch.ones(2, 40, 40, dtype=torch.bool)), views=3)
    torch.manual_seed(3)
    views, rejected = crop(torch.stack([img, -img]), torch.ones(2, 40, 40, dtype=torch.bool), views=3)
    assert views.shape == (3, 2, 3, 16, 16) and rejected.shape == (2, 3) and not rejected.any()
    for v in range(3):
        for b, image in enumerate((img, -img)):
            assert torch.equal(views[v, b], crop_boxes(image[None], boxes[b:b + 1, v:v + 1], 16)[0, 0])


def test_crop_boxes_equal_antialiased_interpolation_of_each_box_alone():
    """All boxes at once give what F.interpolate(bilinear, antialias) gives each box cut out alone: enlarged,
    shrunk, squeezed, kept; at the image's edges too. Boxes of the output size are gathered exactly."""
    torch.manual_seed(0)
    img = torch.randn(2, 3, 40, 36)
    boxes = torch.tensor([[[5, 7, 16, 16], [2, 3, 8, 8], [4, 6, 33, 29], [0, 0, 40, 36], [30, 1, 10, 35]]] * 2)
    boxes[1, :2] += torch.tensor([1, 2, 0, 0])
    views = crop_boxes(img, boxes, 16)
    assert views.shape == (5, 2, 3, 16, 16)
    for b in range(2):
        for v, (top, left, h, w) in enumerate(boxes[b].tolist()):
            patch = img[b:b + 1, :, top:top + h, left:left + w]
            want = F.interpolate(patch, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)[0]
            assert torch.allclose(views[v, b], want, atol=1e-5), (b, v)
    exact = torch.tensor([[[5, 7, 16, 16], [24, 20, 16, 16]]] * 2)
    gathered = crop_boxes(img, exact, 16, exact_size=True)
    for b in range(2):
        for v, (top, left, _, _) in enumerate(exact[b].tolist()):
            assert torch.equal(gathered[v, b], img[b, :, top:top + 16, left:left + 16])
