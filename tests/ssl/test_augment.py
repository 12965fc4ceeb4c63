"""The per-domain multi-crop augmentations (ssl4sci.ssl.augment), on small synthetic images."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import corner_image, make_crop

from ssl4sci.config import ConfigError, validate_config
from ssl4sci.ssl.augment import DOMAIN_SYMMETRIES, MultiCrop, random_symmetry
from ssl4sci.supervised import label_preserving_augment


def pretrain_cfg(domain: str = "lensing", **augment) -> dict:
    """The pretrain section as a job of ``domain`` receives it (null settings resolved), with small crops and
    ``augment`` laid over its augmentation settings."""
    section = validate_config({"pretrain": {"augment": {"domain": domain}}})["pretrain"]
    return {**section, "global_crop_size": 32, "global_crop_scale": [0.4, 1.0], "local_crop_size": 16,
            "local_crop_scale": [0.1, 0.4], "local_crops_number": 3, "augment": {**section["augment"], **augment}}


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
    with pytest.raises(ConfigError, match=r"^config key 'pretrain\.augment\.solarize_prob': expected <= 1, got 1\.5$"):
        validate_config({"pretrain": {"augment": {"solarize_prob": 1.5}}})  # the schema's range, before any job
    with pytest.raises(ValueError, match="matching the dataset statistics"):
        MultiCrop(pretrain_cfg(), [0.0], [1.0], "lensing")(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="scale"):
        make_crop(8, (0.0, 0.5))
    with pytest.raises(ValueError, match="does not match"):
        make_crop(8, (0.1, 0.5))(torch.zeros(1, 1, 16, 16), torch.zeros(8, 8, dtype=torch.bool))


# --- the batched operations against torchvision's per-image ones ---------------------------------

def test_batched_colour_operations_equal_torchvision_image_by_image():
    """Each image of the batch gets its own factor, with the result torchvision gives that image alone."""
    from torchvision.transforms.v2 import functional as TF

    from ssl4sci.ssl.augment import adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation

    torch.manual_seed(0)
    images = torch.rand(5, 3, 12, 12)
    factors = torch.tensor([0.6, 1.0, 1.4, 0.85, 1.2])
    shifts = torch.tensor([-0.1, 0.0, 0.05, 0.1, -0.03])
    ours = {"brightness": adjust_brightness(images, factors), "contrast": adjust_contrast(images, factors),
            "saturation": adjust_saturation(images, factors), "hue": adjust_hue(images, shifts)}
    for i, image in enumerate(images):
        f, h = float(factors[i]), float(shifts[i])
        torchvision = {"brightness": TF.adjust_brightness(image, f), "contrast": TF.adjust_contrast(image, f),
                       "saturation": TF.adjust_saturation(image, f), "hue": TF.adjust_hue(image, h)}
        for name, want in torchvision.items():
            assert torch.allclose(ours[name][i], want, atol=1e-5), name


def test_batched_blur_equals_torchvision_and_leaves_the_others_untouched():
    from torchvision.transforms.v2 import functional as TF

    from ssl4sci.ssl.augment import random_blur

    torch.manual_seed(0)
    images = torch.rand(4, 2, 20, 20)
    apply = torch.tensor([True, False, True, False])
    for sigma in (0.4, 1.3, 5.0):  # 5.0: the kernel is capped by the view's side
        out = random_blur(images, (sigma, sigma), apply)
        kernel = min(2 * math.ceil(3 * sigma) + 1, 2 * 20 - 1)
        for i in range(4):
            want = TF.gaussian_blur(images[i], [kernel, kernel], [sigma, sigma]) if apply[i] else images[i]
            assert torch.allclose(out[i], want, atol=1e-5)
            assert apply[i] or torch.equal(out[i], images[i])


def test_every_image_of_a_batch_gets_its_own_views():
    """Image k of a batch is constant k: each of its views is k, normalised; a batch of one equals the image's own
    call (the per-image API is the batched code)."""
    cfg = pretrain_cfg(noise_std=0.0, blur_prob=0.5)
    multicrop = MultiCrop(cfg, [2.0], [4.0], "lensing")
    raw = torch.arange(6.0).view(6, 1, 1, 1).expand(6, 1, 40, 40).contiguous()
    out = multicrop(raw)
    assert out["crops"].tolist() == [5] * 6 and out["crop_rejects"].shape == (6,)
    for view in out["views"]:
        assert view.shape[0] == 6
        for k in range(6):
            assert torch.allclose(view[k], torch.full_like(view[k], (k - 2.0) / 4.0), atol=1e-6)
    torch.manual_seed(3)
    single = multicrop(raw[2])
    torch.manual_seed(3)
    batched = multicrop(raw[2:3])
    assert all(torch.equal(a, b[0]) for a, b in zip(single["views"], batched["views"]))


def test_the_symmetries_of_a_batch_are_uniform_over_the_dihedral_group():
    torch.manual_seed(0)
    img = torch.arange(16.0).view(1, 4, 4)
    dihedral = [torch.rot90(f, k, dims=(-2, -1)) for f in (img, img.flip(-1)) for k in range(4)]
    out = random_symmetry(img.expand(1600, 1, 4, 4), "lensing")
    counts = torch.zeros(8)
    for view in out:
        counts[[i for i, d in enumerate(dihedral) if torch.equal(view, d)][0]] += 1
    assert counts.min() > 150 and counts.max() < 250  # 200 each; binomial sd 13


def _view_statistics(views: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per view: brightness, contrast, colourfulness and sharpness (pixel space)."""
    return {"mean": views.mean(dim=(1, 2, 3)), "std": views.std(dim=(1, 2, 3)),
            "chroma": (views.amax(dim=1) - views.amin(dim=1)).mean(dim=(1, 2)),
            "roughness": (views.diff(dim=-1).abs().mean(dim=(1, 2, 3)) + views.diff(dim=-2).abs().mean(dim=(1, 2, 3)))}


def test_photo_views_have_the_statistics_of_dinos_per_image_torchvision_chain():
    """The batched photo chain against DINO's recipe written with torchvision's per-image transforms (flip, colour
    jitter p 0.8, grayscale p 0.2, blur p 1.0 / 0.1, solarisation p 0.2 on view 2): per view statistic, the two
    distributions over 400 views agree (two-sample Kolmogorov-Smirnov, p > 0.001)."""
    from scipy.stats import ks_2samp
    from torchvision.transforms import v2

    torch.manual_seed(0)
    base = F.interpolate(torch.rand(400, 3, 8, 8), size=32, mode="bilinear") * 0.8 + 0.2 * torch.rand(400, 3, 32, 32)
    cfg = dict(pretrain_cfg("photo"), local_crops_number=0, global_crop_scale=[1.0, 1.0])
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    views = MultiCrop(cfg, mean, std, "photo")(base)["views"]

    def chain(blur_p: float, solarize_p: float):
        return v2.Compose([v2.RandomHorizontalFlip(), v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                           v2.RandomGrayscale(0.2),
                           v2.RandomApply([v2.GaussianBlur(13, sigma=(0.1, 2.0))], p=blur_p),
                           v2.RandomSolarize(0.5, p=solarize_p)])

    for index, (blur_p, solarize_p) in enumerate([(1.0, 0.0), (0.1, 0.2)]):
        reference = torch.stack([chain(blur_p, solarize_p)(image) for image in base])
        ours = views[index] * 0.25 + 0.5
        for name, values in _view_statistics(ours).items():
            want = _view_statistics(reference)[name]
            assert ks_2samp(values.numpy(), want.numpy()).pvalue > 1e-3, (index, name)
