"""Multi-crop views for self-supervised training, with one augmentation set per image domain.

Input is one *raw* image (C, H, W) of any channel count: the stored pixel values before the dataset's
normalisation (``ImageDataset(..., raw=True)``); output is the DINO multi-crop: two global views and
``local_crops_number`` local views, each normalised with the dataset's mean and std as its last step (as DINO's and
lightly's transforms do). Every crop is content-aware (:mod:`ssl4sci.ssl.crops`): a view of pure background is
redrawn; the signal is found on the raw image.

- ``lensing``: the images are physical measurements, so only augmentations that keep the
  physics: crops, flips, exact 90° rotations (the sky has no preferred orientation), an
  optional blur and Gaussian noise of ``noise_std`` normalised units, added to the normalised view (the one
  step after normalisation: its size is given as a share of the data set's spread). No colour changes:
  relative fluxes between pixels and bands are the signal.
- ``photo``: the recipe of DINO (Caron et al. 2021): crops, horizontal flip, colour jitter,
  grayscale, a blur whose probability depends on the view (1.0 / 0.1 / 0.5) and solarisation
  on the second global view. The colour operations are defined on pixel values in [0, 1], which
  is what the raw view holds. Only 3-channel images are RGB: for other channel counts only
  brightness and contrast (per channel) are jittered.

The geometric symmetries of each domain (:data:`DOMAIN_SYMMETRIES`) are also the label-preserving augmentation of
the supervised stages (``supervised.label_preserving_augment``): one definition for pretraining and fine-tuning.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

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


def check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise ValueError(f"config key 'pretrain.augment.domain': expected one of {', '.join(DOMAINS)}, got {domain!r}")


def random_symmetry(img: torch.Tensor, domain: str) -> torch.Tensor:
    """``img`` under a random element of its domain's :data:`DOMAIN_SYMMETRIES`."""
    symmetries = DOMAIN_SYMMETRIES[domain]
    for dim in symmetries.flip_dims:
        if _coin(0.5):
            img = img.flip(dim)
    if symmetries.rot90:
        img = torch.rot90(img, int(torch.randint(0, 4, ()).item()), dims=(-2, -1))
    return img


class RandomSymmetry(torch.nn.Module):
    """:func:`random_symmetry` of one domain as a transform (the label-preserving augmentation of fine-tuning)."""

    def __init__(self, domain: str):
        super().__init__()
        check_domain(domain)
        self.domain = domain

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return random_symmetry(img, self.domain)


PHOTO_BLUR_PROBS = (1.0, 0.1, 0.5)
"""DINO's blur probability for global view 1, global view 2 and the local views."""

LENSING_BLUR_SIGMA = (0.1, 1.5)  # pixels of the view: keeps some of the small-scale substructure
PHOTO_BLUR_SIGMA = (0.1, 2.0)  # DINO's PIL blur radius range
SOLARIZE_THRESHOLD = 0.5  # in [0, 1] pixel space
JITTER = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1}


def _coin(p: float) -> bool:
    """True with probability ``p``; no random number is drawn for p <= 0 or p >= 1."""
    if p <= 0:
        return False
    return p >= 1 or bool(torch.rand(()) < p)


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand(()))


class GaussianNoise(torch.nn.Module):
    """Add N(0, std²) to every pixel; ``std`` in the units of the input, a number or one per channel (C, 1, 1).
    No random number is drawn when every std is 0."""

    def __init__(self, std: float | torch.Tensor):
        super().__init__()
        self.std = torch.as_tensor(std, dtype=torch.float32)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return img + self.std * torch.randn_like(img) if bool((self.std > 0).any()) else img


def random_blur(img: torch.Tensor, sigma_range: Sequence[float]) -> torch.Tensor:
    """Gaussian blur with sigma uniform in ``sigma_range`` (pixels), kernel ±3 sigma, any channel count.

    The kernel is capped below twice the view's side because the reflect padding cannot be wider
    than the view (relevant for small local crops).
    """
    sigma = _uniform(*sigma_range)
    kernel = min(2 * math.ceil(3 * sigma) + 1, 2 * min(img.shape[-2:]) - 1)
    return TF.gaussian_blur(img, kernel_size=[kernel, kernel], sigma=[sigma, sigma])


def brightness_contrast(img: torch.Tensor, brightness: float, contrast: float) -> torch.Tensor:
    """Brightness and contrast jitter per channel, in random order, for images in [0, 1] that are not RGB.

    Same factors as torchvision's ColorJitter (uniform in [1 - b, 1 + b]), but contrast blends
    each channel with its own mean: with no colour model, a grayscale mean over channels has
    no meaning.
    """
    b = _uniform(max(0.0, 1 - brightness), 1 + brightness)
    c = _uniform(max(0.0, 1 - contrast), 1 + contrast)
    ops = [lambda x: (x * b).clamp(0, 1), lambda x: (c * x + (1 - c) * x.mean(dim=(-2, -1), keepdim=True)).clamp(0, 1)]
    for i in torch.randperm(2).tolist():
        img = ops[i](img)
    return img


class MultiCrop:
    """``[global_1, global_2, local_1, ..., local_n]`` normalised views of one raw image, plus crop statistics.

    ``cfg`` is the validated ``pretrain`` config section (``global_crop_size``, ``global_crop_scale``,
    ``local_crop_size``, ``local_crop_scale``, ``local_crops_number`` and ``augment``, whose null settings
    ``ssl4sci.config`` has resolved for the domain); ``mean``/``std`` are the dataset's per-channel statistics, with
    which every view is normalised as its last step; ``domain`` is ``"lensing"`` or ``"photo"``.
    ``photo_blur_probs`` overrides DINO's per-view blur probabilities (global 1, global 2, local); it is not a config
    key, the recipe is fixed, but tests and ablations need it.

    Calling returns ``{"views": [...], "crops": 2 + n_local, "crop_rejects": total rejected
    candidate boxes}``; the default collate turns it into a list of (B, C, h, w) tensors and two
    LongTensors (B,), so the training loop can log how often crops land on empty sky.
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
        self._noise = GaussianNoise(aug["noise_std"])
        self._jitter = v2.ColorJitter(**JITTER)

    def _crop(self, size: int, scale: Sequence[float]) -> ContentAwareResizedCrop:
        aug = self.aug
        return ContentAwareResizedCrop(size, scale, min_signal_fraction=aug["min_signal_fraction"],
                                       max_tries=aug["max_tries"], keep_centre=aug["keep_centre"],
                                       sigma=aug["signal_sigma"], zoom=aug["zoom"])

    def __repr__(self) -> str:
        return f"MultiCrop(domain={self.domain!r}, global={self.global_crop}, local={self.local_crop} x {self.n_local})"

    def __call__(self, raw: torch.Tensor) -> dict:
        if raw.ndim != 3 or raw.shape[0] != self.mean.shape[0]:
            raise ValueError(f"MultiCrop: expected an image ({self.mean.shape[0]}, H, W) matching the dataset "
                             f"statistics, got shape {tuple(raw.shape)}")
        signal = SignalMap.from_image(raw, self.aug["signal_sigma"])  # one per image, shared by all views
        views, rejects = [], 0
        for i in range(2 + self.n_local):
            crop = self.global_crop if i < 2 else self.local_crop
            view, n_rejected = crop(raw, signal)
            rejects += n_rejected
            if self.domain == LENSING:
                views.append(self._noise(self.normalise(self._lensing(view))))
            else:
                views.append(self.normalise(self._photo(view, i)))
        return {"views": views, "crops": len(views), "crop_rejects": rejects}

    def normalise(self, view: torch.Tensor) -> torch.Tensor:
        """The last step of every view: the dataset's normalisation (as ``PreparedData.normalise``)."""
        return (view - self.mean) / self.std

    def _lensing(self, view: torch.Tensor) -> torch.Tensor:
        """Flips, 90° rotation, optional blur: the dihedral group plus the optics, nothing else (the detector's
        noise follows normalisation)."""
        view = random_symmetry(view, LENSING)
        if _coin(self.aug["blur_prob"]):
            view = random_blur(view, LENSING_BLUR_SIGMA)
        return view

    def _photo(self, view: torch.Tensor, index: int) -> torch.Tensor:
        """DINO's photometric chain for view ``index`` (0, 1: global; >= 2: local), on [0, 1] pixel values."""
        view = random_symmetry(view, PHOTO)
        rgb = view.shape[0] == 3
        if _coin(self.aug["color_jitter_prob"]):
            view = self._jitter(view) if rgb else brightness_contrast(view, JITTER["brightness"], JITTER["contrast"])
        if rgb and _coin(self.aug["grayscale_prob"]):
            view = TF.rgb_to_grayscale(view, num_output_channels=3)
        if _coin(self.photo_blur_probs[min(index, 2)]):
            view = random_blur(view, PHOTO_BLUR_SIGMA)
        if index == 1 and _coin(self.aug["solarize_prob"]):
            view = TF.solarize(view, threshold=SOLARIZE_THRESHOLD)
        return view
