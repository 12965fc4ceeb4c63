"""Content-aware crops and the per-domain multi-crop augmentations, on small synthetic images."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import default_section

from ssl4sci.config import validate_config
from ssl4sci.ssl.augment import DOMAIN_SYMMETRIES, MultiCrop, random_symmetry
from ssl4sci.ssl.crops import ContentAwareResizedCrop, SignalMap, box_fractions, sample_boxes, signal_mask
from ssl4sci.supervised import label_preserving_augment

SIZE, SQUARE = 64, 24  # a bright SQUARE x SQUARE block in the top-left corner of a SIZE x SIZE noisy sky


def corner_image(channels: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    img = 0.05 * torch.randn(channels, SIZE, SIZE, generator=g)
    img[:, :SQUARE, :SQUARE] += 1.0
    return img


def truth_fraction(box) -> float:
    """Share of the box inside the known bright square, computed from geometry alone."""
    top, left, h, w = box
    rows = max(0, min(top + h, SQUARE) - top)
    cols = max(0, min(left + w, SQUARE) - left)
    return rows * cols / (h * w)


SIGMA = default_section("pretrain")["augment"]["signal_sigma"]


def pretrain_cfg(domain: str = "lensing", **augment) -> dict:
    """The pretrain section as a job of ``domain`` receives it (null settings resolved), with small crops and
    ``augment`` laid over its augmentation settings."""
    section = validate_config({"pretrain": {"augment": {"domain": domain}}})["pretrain"]
    return {**section, "global_crop_size": 32, "global_crop_scale": [0.4, 1.0], "local_crop_size": 16,
            "local_crop_scale": [0.1, 0.4], "local_crops_number": 3, "augment": {**section["augment"], **augment}}


def make_crop(size: int, scale, **settings) -> ContentAwareResizedCrop:
    """A content-aware crop with the default ``pretrain.augment`` thresholds, placed anywhere and resized (a plain
    RandomResizedCrop's geometry) unless ``settings`` say otherwise."""
    augment = default_section("pretrain")["augment"]
    plain = {"min_signal_fraction": augment["min_signal_fraction"], "max_tries": augment["max_tries"],
             "sigma": augment["signal_sigma"], "keep_centre": False, "zoom": True}
    return ContentAwareResizedCrop(size, scale, **{**plain, **settings})


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
    got = SignalMap(mask).fractions(*boxes.unbind(1))
    want = torch.tensor([mask[top:top + h, left:left + w].sum().item() / (h * w) for top, left, h, w in boxes.tolist()],
                        dtype=torch.float64)
    assert torch.equal(got, want)
    table = SignalMap(mask).table
    assert box_fractions(table, [0], [0], [23], [31]).item() == pytest.approx(mask.float().mean().item())


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
    view, _ = crop(img, torch.ones(40, 40, dtype=torch.bool))
    assert (bh, bw) == (24, 24) and torch.equal(view, img[:, top:top + 24, left:left + 24])


def test_crop_returns_the_resized_selected_box():
    img = torch.randn(3, 40, 40)
    crop = make_crop(16, (0.1, 0.5), min_signal_fraction=0.0)
    torch.manual_seed(3)
    (top, left, h, w), _ = crop.select(SignalMap(torch.ones(40, 40, dtype=torch.bool)))
    torch.manual_seed(3)
    view, rejected = crop(img, torch.ones(40, 40, dtype=torch.bool))
    want = F.interpolate(img[None, :, top:top + h, left:left + w], size=(16, 16), mode="bilinear", antialias=True,
                         align_corners=False)[0]
    assert rejected == 0 and torch.allclose(view, want)


def test_multicrop_reports_rejects_on_a_mostly_blank_image():
    torch.manual_seed(0)
    img = corner_image()
    cfg = pretrain_cfg(min_signal_fraction=0.2, keep_centre=False, max_tries=20)
    cfg["local_crop_scale"] = [0.02, 0.1]
    picky = MultiCrop(cfg, [0.0], [1.0], "lensing")
    blind = MultiCrop(dict(cfg, augment={**cfg["augment"], "min_signal_fraction": 0.0}), [0.0], [1.0], "lensing")
    assert sum(picky(img)["crop_rejects"] for _ in range(10)) > 0
    assert sum(blind(img)["crop_rejects"] for _ in range(10)) == 0


# --- multi-crop: shapes, collation, domains ----------------------------------------------------


@pytest.mark.parametrize("domain", ["lensing", "photo"])
@pytest.mark.parametrize("channels", [1, 3, 5])
def test_views_shapes_counts_and_collation(domain, channels):
    mean, std = [0.4] * channels, [0.2] * channels
    multicrop = MultiCrop(pretrain_cfg(domain, blur_prob=0.5), mean, std, domain)
    items = [multicrop(torch.rand(channels, 40, 40)) for _ in range(4)]
    out = items[0]
    assert [tuple(v.shape) for v in out["views"]] == [(channels, 32, 32)] * 2 + [(channels, 16, 16)] * 3
    assert out["crops"] == 5 and isinstance(out["crop_rejects"], int) and 0 <= out["crop_rejects"] <= 5 * 10
    assert all(torch.isfinite(v).all() for v in out["views"])
    batch = torch.utils.data.default_collate(items)
    assert [tuple(v.shape) for v in batch["views"]] == [(4, channels, 32, 32)] * 2 + [(4, channels, 16, 16)] * 3
    assert batch["crops"].dtype == torch.long and batch["crops"].tolist() == [5] * 4
    assert batch["crop_rejects"].dtype == torch.long and batch["crop_rejects"].shape == (4,)


def test_lensing_views_are_exact_flips_and_rotations_without_noise_or_blur():
    torch.manual_seed(0)
    img = torch.randn(2, 32, 32)
    cfg = pretrain_cfg(noise_std=0.0, blur_prob=0.0)
    cfg["global_crop_scale"] = [1.0, 1.0]
    dihedral = [torch.rot90(f, k, dims=(-2, -1)) for f in (img, img.flip(-1)) for k in range(4)]
    seen = set()
    for _ in range(30):
        for view in MultiCrop(cfg, [0.0, 0.0], [1.0, 1.0], "lensing")(img)["views"][:2]:
            matches = [i for i, d in enumerate(dihedral) if torch.equal(view, d)]
            assert len(matches) == 1
            assert torch.equal(view.flatten().sort().values, img.flatten().sort().values)
            seen.add(matches[0])
    assert len(seen) == 8  # all of the dihedral group shows up


def test_lensing_noise_is_added_in_normalised_units():
    torch.manual_seed(0)
    raw = torch.zeros(1, 32, 32)
    raw[0, 12:20, 12:20] = 5.0
    cfg = pretrain_cfg(noise_std=0.5, blur_prob=0.0)
    cfg["global_crop_scale"] = [1.0, 1.0]
    view = MultiCrop(cfg, [100.0], [10.0], "lensing")(raw)["views"][0]
    residual = view - (raw - 100.0) / 10.0  # the square is symmetric under the dihedral group
    assert residual.std().item() == pytest.approx(0.5, rel=0.1)


# --- normalisation last, one set of symmetries -------------------------------------------------


@pytest.mark.parametrize("domain", ["lensing", "photo"])
def test_raw_images_in_normalised_views_out(domain):
    """The multi-crop takes the stored pixel values and normalises every view as its last step: views of images
    drawn with the dataset's per-channel statistics have mean 0 and std 1 in every channel."""
    torch.manual_seed(0)
    mean, std = torch.tensor([0.2, 0.5, 0.7]), torch.tensor([0.05, 0.1, 0.15])
    colourless = {"color_jitter_prob": 0.0, "grayscale_prob": 0.0, "solarize_prob": 0.0, "blur_prob": 0.0}
    cfg = pretrain_cfg(domain, **colourless)
    cfg["global_crop_scale"] = [1.0, 1.0]  # whole-image views: no resampling to smooth the pixels
    multicrop = MultiCrop(cfg, mean.tolist(), std.tolist(), domain, photo_blur_probs=(0, 0, 0))
    raws = mean[:, None, None] + std[:, None, None] * torch.randn(64, 3, 32, 32)
    views = torch.stack([multicrop(raw)["views"][0] for raw in raws])
    assert views.mean(dim=(0, 2, 3)).tolist() == pytest.approx([0.0] * 3, abs=0.01)
    assert views.std(dim=(0, 2, 3)).tolist() == pytest.approx([1.0] * 3, abs=0.02)  # + 0.02 noise for lensing


def test_normalisation_is_the_last_step_of_a_lensing_view():
    """Without noise and blur a full-size lensing view is exactly an element of the dihedral group applied to the raw
    image, then normalised (the same operations as the dataset's own normalisation, bit for bit)."""
    torch.manual_seed(0)
    raw = torch.rand(2, 32, 32)
    mean, std = [0.3, 0.6], [0.2, 0.4]
    cfg = pretrain_cfg(noise_std=0.0, blur_prob=0.0)
    cfg["global_crop_scale"] = [1.0, 1.0]
    multicrop = MultiCrop(cfg, mean, std, "lensing")
    normalised = [(d - multicrop.mean) / multicrop.std
                  for d in (torch.rot90(f, k, dims=(-2, -1)) for f in (raw, raw.flip(-1)) for k in range(4))]
    for _ in range(10):
        for view in multicrop(raw)["views"][:2]:
            assert sum(torch.equal(view, n) for n in normalised) == 1


@pytest.mark.parametrize("domain", ["lensing", "photo"])
def test_fine_tuning_and_pretraining_draw_from_one_set_of_symmetries(domain):
    img = torch.arange(48.0).reshape(3, 4, 4)
    torch.manual_seed(0)
    supervised = [label_preserving_augment(domain)(img) for _ in range(50)]
    torch.manual_seed(0)
    shared = [random_symmetry(img, domain) for _ in range(50)]
    assert all(torch.equal(a, b) for a, b in zip(supervised, shared))
    assert DOMAIN_SYMMETRIES["photo"].rot90 is False and DOMAIN_SYMMETRIES["lensing"].rot90 is True
    distinct = {t.numpy().tobytes() for t in shared}
    assert len(distinct) == (8 if domain == "lensing" else 2)


def photo_cfg(**augment) -> dict:
    cfg = pretrain_cfg("photo", **{"color_jitter_prob": 0.0, "grayscale_prob": 0.0, "solarize_prob": 0.0, **augment})
    cfg["global_crop_scale"] = [1.0, 1.0]
    return cfg


def test_photo_solarisation_happens_in_pixel_space_on_global_view_2_only():
    torch.manual_seed(0)
    mean, std = torch.tensor([0.3, 0.5, 0.7]), torch.tensor([0.1, 0.2, 0.3])
    x = torch.rand(3, 32, 32)
    x = torch.where((x - 0.5).abs() < 0.01, torch.full_like(x, 0.2), x)  # away from the threshold
    multicrop = MultiCrop(photo_cfg(solarize_prob=1.0), mean.tolist(), std.tolist(), "photo",
                          photo_blur_probs=(0, 0, 0))
    for _ in range(5):
        g1, g2 = (v * std[:, None, None] + mean[:, None, None] for v in multicrop(x)["views"][:2])
        for view, solarised in ((g1, False), (g2, True)):
            matches = 0
            for source in (x, x.flip(-1)):
                want = torch.where(source >= 0.5, 1 - source, source) if solarised else source
                matches += torch.allclose(view, want, atol=1e-5)
            assert matches == 1


def test_photo_colour_operations_work_on_unnormalised_pixels():
    torch.manual_seed(0)
    mean, std = torch.tensor([0.2, 0.5, 0.8]), torch.tensor([0.05, 0.1, 0.15])
    x = torch.rand(3, 32, 32)
    # Grayscale in pixel space: equal channels after un-normalising (not before: the stats differ).
    gray = MultiCrop(photo_cfg(grayscale_prob=1.0), mean.tolist(), std.tolist(), "photo", photo_blur_probs=(0, 0, 0))
    view = gray(x)["views"][0]
    pixels = view * std[:, None, None] + mean[:, None, None]
    assert torch.allclose(pixels[0], pixels[1], atol=1e-5) and torch.allclose(pixels[1], pixels[2], atol=1e-5)
    assert not torch.allclose(view[0], view[1], atol=1e-2)
    # Jitter clamps to [0, 1] in pixel space and keeps the spread of the pixels.
    jitter = MultiCrop(photo_cfg(color_jitter_prob=1.0), mean.tolist(), std.tolist(), "photo",
                       photo_blur_probs=(0, 0, 0))
    for _ in range(5):
        for v in jitter(x)["views"]:
            p = v * std[:, None, None] + mean[:, None, None]
            assert p.min() >= -1e-5 and p.max() <= 1 + 1e-5 and (p.amax(dim=(1, 2)) - p.amin(dim=(1, 2))).min() > 0.2


def test_photo_single_channel_jitters_brightness_and_contrast_only():
    torch.manual_seed(0)
    x = torch.rand(1, 32, 32)
    multicrop = MultiCrop(photo_cfg(color_jitter_prob=1.0, grayscale_prob=1.0), [0.3], [0.1], "photo",
                          photo_blur_probs=(0, 0, 0))
    changed = 0
    for _ in range(5):
        pixels = (multicrop(x)["views"][0] * 0.1 + 0.3).flatten()
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
        # Brightness, contrast and clamping are increasing maps of each pixel: the order of the pixels survives.
        monotone = [bool((pixels[s.flatten().argsort()].diff() >= -1e-5).all()) for s in (x, x.flip(-1))]
        assert monotone.count(True) == 1
        changed += (not torch.allclose(pixels, x.flatten(), atol=1e-3)
                    and not torch.allclose(pixels, x.flip(-1).flatten(), atol=1e-3))
    assert changed == 5


def test_default_photo_recipe_blurs_global_view_1_always_and_view_2_rarely():
    torch.manual_seed(0)
    x = torch.rand(3, 32, 32)
    cfg = dict(photo_cfg(), local_crops_number=0)
    multicrop = MultiCrop(cfg, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25], "photo")  # DINO's blur probabilities

    def roughness(t):
        return (t.diff(dim=-1).abs().mean() + t.diff(dim=-2).abs().mean()).item()

    blurred = torch.zeros(2)
    for _ in range(20):
        views = multicrop(x)["views"][:2]
        blurred += torch.tensor([roughness(v * 0.25 + 0.5) < 0.95 * roughness(x) for v in views], dtype=torch.float32)
    assert blurred[0] >= 15 and blurred[1] <= 6  # p = 1.0 (sigma can be too small to show) and p = 0.1


# --- determinism and errors --------------------------------------------------------------------


@pytest.mark.parametrize("domain", ["lensing", "photo"])
def test_views_are_deterministic_under_manual_seed(domain):
    img = corner_image(channels=3)
    multicrop = MultiCrop(pretrain_cfg(domain, blur_prob=0.5), [0.1, 0.1, 0.1], [0.3, 0.3, 0.3], domain)

    def run(seed):
        torch.manual_seed(seed)
        return multicrop(img)

    a, b, c = run(7), run(7), run(8)
    assert a["crop_rejects"] == b["crop_rejects"]
    assert all(torch.equal(u, v) for u, v in zip(a["views"], b["views"]))
    assert not all(torch.equal(u, v) for u, v in zip(a["views"], c["views"]))


def test_unknown_domain_names_the_config_key():
    with pytest.raises(ValueError, match=r"pretrain\.augment\.domain.*'sonar'"):
        MultiCrop(pretrain_cfg(), [0.0], [1.0], "sonar")
    with pytest.raises(ValueError, match=r"pretrain\.augment\.domain.*'sonar'"):
        label_preserving_augment("sonar")


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="pretrain.augment.solarize_prob"):
        MultiCrop(pretrain_cfg("photo", solarize_prob=1.5), [0.0], [1.0], "photo")
    with pytest.raises(ValueError, match="matching the dataset statistics"):
        MultiCrop(pretrain_cfg(), [0.0], [1.0], "lensing")(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="scale"):
        make_crop(8, (0.0, 0.5))
    with pytest.raises(ValueError, match="does not match"):
        make_crop(8, (0.1, 0.5))(torch.zeros(1, 16, 16), torch.zeros(8, 8, dtype=torch.bool))
