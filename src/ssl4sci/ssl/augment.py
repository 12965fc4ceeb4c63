"""Multi-crop views for self-supervised training, with one augmentation set per image domain, for a whole batch.

Input is a batch of *raw* images (B, C, H, W) of any channel count: the stored pixel values before the dataset's
normalisation (``ImageDataset(..., raw=True)``); output is the DINO multi-crop: two global views and
``local_crops_number`` local views per image, each normalised with the dataset's mean and std as its last step (as
DINO's and lightly's transforms do). Every crop is content-aware (:mod:`ssl4sci.ssl.crops`): a view of pure
background is redrawn; the signal is found on the raw image.

Every operation is a batched tensor operation with per-image random parameters, on the batch's device and without
host synchronisation: the same code runs in a CPU loader worker (``MultiCrop.collate``) and on a GPU after the copy
(``pretrain.augment.on_device``). An image is a batch of one.

- ``lensing``: the images are physical measurements, so only augmentations that keep the
  physics: crops, flips, exact 90° rotations (the sky has no preferred orientation), an
  optional blur and Gaussian noise of ``noise_std`` normalised units, added to the normalised view (the one
  step after normalisation: its size is given as a share of the data set's spread). No colour changes:
  relative fluxes between pixels and bands are the signal.
- ``photo``: the recipe of DINO (Caron et al. 2021): crops, horizontal flip, colour jitter (brightness, contrast,
  saturation, hue in a random order per view, as torchvision's ColorJitter), grayscale, a blur whose probability
  depends on the view (1.0 / 0.1 / 0.5) and solarisation on the second global view. The colour operations are
  defined on pixel values in [0, 1], which is what the raw view holds. Only 3-channel images are RGB: for other
  channel counts only brightness and contrast (per channel) are jittered.

The geometric symmetries of each domain (:data:`DOMAIN_SYMMETRIES`) are also the label-preserving augmentation of
the supervised stages (``supervised.label_preserving_augment``): one definition for pretraining and fine-tuning.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from ssl4sci.registry.domains import LENSING, PHOTO
from ssl4sci.ssl.crops import ContentAwareResizedCrop, SignalMap

DOMAINS = (LENSING, PHOTO)


@dataclass(frozen=True)
class Symmetries:
    """The geometric changes that keep a domain's images valid and their labels true, drawn in this order: a mirror
    along each of ``flip_dims`` with probability 1/2 each, then, with ``rot90``, a rotation by a random multiple of
    90° (exact: no interpolation of the pixels)."""

    flip_dims: tuple[int, ...]
    rot90: bool


DOMAIN_SYMMETRIES: dict[str, Symmetries] = {
    # The sky has no preferred orientation: the dihedral group of the square.
    LENSING: Symmetries(flip_dims=(-1, -2), rot90=True),
    # A mirrored butterfly is still a butterfly; an upside-down photo is not a photo anyone takes.
    PHOTO: Symmetries(flip_dims=(-1,), rot90=False),
}
"""Per image domain, the symmetries both pretraining's views and fine-tuning's training images are drawn from."""

PHOTO_BLUR_PROBS = (1.0, 0.1, 0.5)
"""DINO's blur probability for global view 1, global view 2 and the local views."""

LENSING_BLUR_SIGMA = (0.1, 1.5)  # pixels of the view: keeps some of the small-scale substructure
PHOTO_BLUR_SIGMA = (0.1, 2.0)  # DINO's PIL blur radius range
SOLARIZE_THRESHOLD = 0.5  # in [0, 1] pixel space
JITTER = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1}
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale rounds it


def check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise ValueError(f"config key 'pretrain.augment.domain': expected one of {', '.join(DOMAINS)}, got {domain!r}")


# --- per-image random draws for a batch -----------------------------------------------------------

def _per_image(values: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, 1, 1): one value per image, broadcast over its channels and pixels."""
    return values.view(-1, 1, 1, 1)


def _coins(p: float | torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """(N,) booleans, True with probability ``p`` (a number or one per image)."""
    return torch.rand(n, device=device) < p


def _uniform(lo: float, hi: float, n: int, device: torch.device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, device=device)


# --- geometry -----------------------------------------------------------------------------------------

def random_symmetry(images: torch.Tensor, domain: str) -> torch.Tensor:
    """Each image of ``images`` (N, C, S, S), or the one image (C, S, S), under its own random element of its
    domain's :data:`DOMAIN_SYMMETRIES`."""
    if images.ndim == 3:
        return random_symmetry(images[None], domain)[0]
    symmetries = DOMAIN_SYMMETRIES[domain]
    n, device = images.shape[0], images.device
    for dim in symmetries.flip_dims:
        images = torch.where(_per_image(_coins(0.5, n, device)), images.flip(dim), images)
    if symmetries.rot90:
        turns = _per_image(torch.randint(0, 4, (n,), device=device))
        rotated = images
        for k in (1, 2, 3):
            rotated = torch.where(turns == k, torch.rot90(images, k, dims=(-2, -1)), rotated)
        images = rotated
    return images


class RandomSymmetry(torch.nn.Module):
    """:func:`random_symmetry` of one domain as a transform (the label-preserving augmentation of fine-tuning)."""

    def __init__(self, domain: str):
        super().__init__()
        check_domain(domain)
        self.domain = domain

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return random_symmetry(img, self.domain)


def random_blur(images: torch.Tensor, sigma_range: Sequence[float], apply: torch.Tensor) -> torch.Tensor:
    """Gaussian blur of the images (N, C, S, S) where ``apply`` (N,) is True, each with its own sigma uniform in
    ``sigma_range`` (pixels) and kernel ±ceil(3 sigma), reflect padding; the others are returned unchanged.

    The radius is capped at S - 1 because the reflect padding cannot be wider than the view (relevant for small
    local crops). One separable, grouped convolution for the whole batch: every image's kernel is padded with zeros
    to the widest one, and an image not blurred gets the unit impulse, which leaves it exactly as it was.
    """
    n, c, h, w = images.shape
    device = images.device
    sigma = _uniform(*sigma_range, n, device)
    widest = min(math.ceil(3 * max(sigma_range)), min(h, w) - 1)
    offsets = torch.arange(-widest, widest + 1, device=device, dtype=torch.float32)
    radius = torch.ceil(3 * sigma).clamp(max=widest)
    kernel = torch.exp(-0.5 * (offsets / sigma[:, None]) ** 2) * (offsets.abs() <= radius[:, None])
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    kernel = torch.where(apply[:, None], kernel, (offsets == 0).to(kernel.dtype))
    kernel = kernel.repeat_interleave(c, dim=0)  # (N * C, K): one kernel per channel of each image
    x = F.pad(images.reshape(1, n * c, h, w), (widest,) * 4, mode="reflect")
    x = F.conv2d(x, kernel[:, None, None, :], groups=n * c)
    x = F.conv2d(x, kernel[:, None, :, None], groups=n * c)
    return x.view(n, c, h, w)


# --- colour, on [0, 1] pixel values ------------------------------------------------------------------

def grayscale(rgb: torch.Tensor) -> torch.Tensor:
    """Luma (N, 1, H, W) of RGB images (N, 3, H, W)."""
    weights = torch.tensor(GRAY_WEIGHTS, device=rgb.device, dtype=rgb.dtype).view(1, 3, 1, 1)
    return (rgb * weights).sum(dim=1, keepdim=True)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor x images + (1 - factor) x other, clamped to [0, 1]; factor 1 returns images unchanged (bit for bit)."""
    factor = _per_image(factor)
    return (factor * images + (1 - factor) * other).clamp(0, 1)


def _rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    r, g, b = rgb.unbind(1)
    value, _ = rgb.max(dim=1)
    chroma = value - rgb.min(dim=1).values
    saturation = torch.where(value > 0, chroma / value.clamp_min(1e-12), torch.zeros_like(value))
    safe = chroma.clamp_min(1e-12)
    hue = torch.where(value == r, ((g - b) / safe) % 6, torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = torch.where(chroma > 0, hue / 6, torch.zeros_like(hue)) % 1.0
    return torch.stack([hue, saturation, value], dim=1)


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    hue, saturation, value = hsv.unbind(1)
    # Channel n in (5, 3, 1) for (R, G, B): V - V S clamp(min(k, 4 - k), 0, 1) with k = (n + 6 H) mod 6.
    channels = []
    for n in (5, 3, 1):
        k = (n + 6 * hue) % 6
        channels.append(value - value * saturation * torch.minimum(k, 4 - k).clamp(0, 1))
    return torch.stack(channels, dim=1)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Each image (N, C, H, W) times its factor (N,), clamped to [0, 1]."""
    return _blend(images, torch.zeros((), device=images.device), factor)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Each image blended with its mean gray level (RGB) or, with no colour model, each channel with its own mean."""
    if images.shape[1] == 3:
        return _blend(images, grayscale(images).mean(dim=(-3, -2, -1), keepdim=True), factor)
    return _blend(images, images.mean(dim=(-2, -1), keepdim=True), factor)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """RGB images blended with their own grayscale version."""
    return _blend(images, grayscale(images), factor)


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """RGB images with each one's hue turned by its shift (N,), in turns (-0.5 .. 0.5)."""
    hsv = _rgb_to_hsv(images)
    hue = (hsv[:, 0] + shift.view(-1, 1, 1)) % 1.0
    return _hsv_to_rgb(torch.stack([hue, hsv[:, 1], hsv[:, 2]], dim=1))


def _jitter_ops(rgb: bool) -> list[tuple[float, float, float, Callable]]:
    """(low, high, identity factor, op(images, factors)) of each jitter, in torchvision's order."""
    ops = [(1 - JITTER["brightness"], 1 + JITTER["brightness"], 1.0, adjust_brightness),
           (1 - JITTER["contrast"], 1 + JITTER["contrast"], 1.0, adjust_contrast)]
    if rgb:
        ops += [(1 - JITTER["saturation"], 1 + JITTER["saturation"], 1.0, adjust_saturation),
                (-JITTER["hue"], JITTER["hue"], 0.0, adjust_hue)]
    return ops


def color_jitter(images: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """torchvision's ColorJitter(0.4, 0.4, 0.2, 0.1) for RGB images (N, 3, H, W) in [0, 1], brightness and contrast
    per channel for other channel counts, with each image's own factors and order; only where ``apply`` (N,).

    Each position of the random order applies every operation to the whole batch, with the identity factor for the
    images whose permutation puts another operation there (brightness, contrast and saturation at factor 1 are exact
    identities; the hue round trip is not, so it is selected instead).
    """
    n, device, original = images.shape[0], images.device, images
    ops = _jitter_ops(images.shape[1] == 3)
    factors = [torch.where(apply, _uniform(max(0.0, lo), hi, n, device), torch.full((n,), one, device=device))
               for lo, hi, one, _ in ops]
    order = torch.rand(n, len(ops), device=device).argsort(dim=1)  # a uniform permutation per image
    for position in range(len(ops)):
        for index, (_, _, one, op) in enumerate(ops):
            here = order[:, position] == index
            if one == 0.0:  # hue: computed for all, kept where it is this image's turn
                images = torch.where(_per_image(here & apply), op(images, factors[index]), images)
            else:
                images = op(images, torch.where(here, factors[index], torch.ones_like(factors[index])))
    return torch.where(_per_image(apply), images, original)  # the clamping of the blends touches no other image


def random_grayscale(images: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """RGB images (N, 3, H, W) turned to gray (in all three channels) where ``apply`` (N,)."""
    return torch.where(_per_image(apply), grayscale(images).expand_as(images), images)


def solarize(images: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """Pixels >= SOLARIZE_THRESHOLD inverted (x -> 1 - x) in the images where ``apply`` (N,)."""
    return torch.where(_per_image(apply) & (images >= SOLARIZE_THRESHOLD), 1 - images, images)


class MultiCrop:
    """``[global_1, global_2, local_1, ..., local_n]`` normalised views of a batch of raw images, plus crop statistics.

    ``cfg`` is the validated ``pretrain`` config section (``global_crop_size``, ``global_crop_scale``,
    ``local_crop_size``, ``local_crop_scale``, ``local_crops_number`` and ``augment``, whose null settings
    ``ssl4sci.config`` has resolved for the domain); ``mean``/``std`` are the dataset's per-channel statistics, with
    which every view is normalised as its last step; ``domain`` is ``"lensing"`` or ``"photo"``.
    ``photo_blur_probs`` overrides DINO's per-view blur probabilities (global 1, global 2, local); it is not a config
    key, the recipe is fixed, but tests and ablations need it.

    Calling with a batch (B, C, H, W) returns ``{"views": [(B, C, h, w), ...], "crops": LongTensor (B,) of 2 + n_local,
    "crop_rejects": LongTensor (B,) of rejected candidate boxes}``, all on the batch's device, so the training loop can
    log how often crops land on empty sky; with one image (C, H, W) the views are (C, h, w) and the counts ints.
    """

    def __init__(self, cfg: dict, mean: Sequence[float], std: Sequence[float], domain: str,
                 *, photo_blur_probs: Sequence[float] = PHOTO_BLUR_PROBS):
        check_domain(domain)
        self.domain = domain
        self.aug = aug = cfg["augment"]
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
        if self.mean.shape != self.std.shape:
            raise ValueError(f"MultiCrop: mean and std differ in length ({len(self.mean)} vs {len(self.std)})")
        if not bool((self.std > 0).all()):
            raise ValueError(f"MultiCrop: std must be positive, got {self.std.flatten().tolist()}")
        if len(photo_blur_probs) != 3:
            raise ValueError(f"MultiCrop: photo_blur_probs must be (global 1, global 2, local), got {photo_blur_probs}")
        self.photo_blur_probs = tuple(float(p) for p in photo_blur_probs)
        self.n_local = int(cfg["local_crops_number"])
        self.global_crop = self._crop(cfg["global_crop_size"], cfg["global_crop_scale"])
        self.local_crop = self._crop(cfg["local_crop_size"], cfg["local_crop_scale"])
        # noise_std is in normalised units (a share of the data set's spread), so it is added to the normalised view
        self.noise_std = torch.as_tensor(aug["noise_std"], dtype=torch.float32)
        self._on_device: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _crop(self, size: int, scale: Sequence[float]) -> ContentAwareResizedCrop:
        aug = self.aug
        return ContentAwareResizedCrop(size, scale, min_signal_fraction=aug["min_signal_fraction"],
                                       max_tries=aug["max_tries"], keep_centre=aug["keep_centre"],
                                       sigma=aug["signal_sigma"], zoom=aug["zoom"])

    def __repr__(self) -> str:
        return f"MultiCrop(domain={self.domain!r}, global={self.global_crop}, local={self.local_crop} x {self.n_local})"

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """mean, std and noise std on ``device``, copied once (a copy per batch would synchronise with the host)."""
        if device not in self._on_device:
            self._on_device[device] = tuple(t.to(device) for t in (self.mean, self.std, self.noise_std))
        return self._on_device[device]

    def __call__(self, raw: torch.Tensor) -> dict:
        if raw.ndim == 3:
            out = self(raw[None])
            return {"views": [v[0] for v in out["views"]], "crops": int(out["crops"][0]),
                    "crop_rejects": int(out["crop_rejects"][0])}
        if raw.ndim != 4 or raw.shape[1] != self.mean.shape[0]:
            raise ValueError(f"MultiCrop: expected images (B, {self.mean.shape[0]}, H, W) matching the dataset "
                             f"statistics, got shape {tuple(raw.shape)}")
        raw = raw.to(torch.float32)
        signal = SignalMap.from_image(raw, self.aug["signal_sigma"])  # one per image, shared by all its views
        globals_, rejects = self.global_crop(raw, signal, views=2)
        views = list(self._augment(globals_, first_view=0).unbind(0))
        if self.n_local:
            locals_, local_rejects = self.local_crop(raw, signal, views=self.n_local)
            views.extend(self._augment(locals_, first_view=2).unbind(0))
            rejects = torch.cat([rejects, local_rejects], dim=1)
        n = raw.shape[0]
        return {"views": views, "crops": torch.full((n,), len(views), dtype=torch.long, device=raw.device),
                "crop_rejects": rejects.sum(dim=1)}

    def collate(self, items: list) -> tuple[dict, torch.Tensor]:
        """A DataLoader's ``collate_fn``: (raw image, label) items -> (this batch's views, labels), in the worker."""
        raw, labels = default_collate(items)[:2]
        return self(raw), labels

    def _augment(self, crops: torch.Tensor, first_view: int) -> torch.Tensor:
        """The domain's chain on crops (V, B, C, h, w) of views ``first_view``, ``first_view + 1``, ...; all V x B
        crops in one batch, with the per-view probabilities per crop."""
        v, b = crops.shape[:2]
        views = crops.reshape(v * b, *crops.shape[2:])
        view_index = torch.arange(first_view, first_view + v, device=crops.device).repeat_interleave(b)
        mean, std, noise_std = self._constants(crops.device)
        if self.domain == LENSING:
            views = self._lensing(views)
            views = (views - mean) / std
            if bool((self.noise_std > 0).any()):  # a host value: no synchronisation
                views = views + noise_std.view(-1, 1, 1) * torch.randn_like(views)
        else:
            views = (self._photo(views, view_index) - mean) / std
        return views.view(v, b, *views.shape[1:])

    def _lensing(self, views: torch.Tensor) -> torch.Tensor:
        """Flips, 90° rotation, optional blur: the dihedral group plus the optics, nothing else (the detector's
        noise follows normalisation)."""
        views = random_symmetry(views, LENSING)
        if self.aug["blur_prob"] > 0:
            views = random_blur(views, LENSING_BLUR_SIGMA, _coins(self.aug["blur_prob"], len(views), views.device))
        return views

    def _photo(self, views: torch.Tensor, view_index: torch.Tensor) -> torch.Tensor:
        """DINO's photometric chain, each crop with the probabilities of its view (0, 1: global; >= 2: local), on
        [0, 1] pixel values."""
        n, device, aug = len(views), views.device, self.aug
        views = random_symmetry(views, PHOTO)
        if aug["color_jitter_prob"] > 0:
            views = color_jitter(views, _coins(aug["color_jitter_prob"], n, device))
        if views.shape[1] == 3 and aug["grayscale_prob"] > 0:
            views = random_grayscale(views, _coins(aug["grayscale_prob"], n, device))
        blur_probs = torch.tensor(self.photo_blur_probs, device=device)[view_index.clamp(max=2)]
        if max(self.photo_blur_probs) > 0:
            views = random_blur(views, PHOTO_BLUR_SIGMA, _coins(blur_probs, n, device))
        if aug["solarize_prob"] > 0:
            views = solarize(views, (view_index == 1) & _coins(aug["solarize_prob"], n, device))
        return views
