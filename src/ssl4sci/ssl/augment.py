"""Multi-crop views for self-supervised training, with one augmentation set per image domain.

Input is one *normalised* image (C, H, W) of any channel count, as ``ImageDataset`` hands it
to its transform; output is the DINO multi-crop: two global views and ``local_crops_number``
local views. Every crop is content-aware (:mod:`ssl4sci.ssl.crops`): a view of pure background
is redrawn.

- ``lensing``: the images are physical measurements, so only augmentations that keep the
  physics: crops, flips, exact 90° rotations (the sky has no preferred orientation), an
  optional blur and Gaussian noise in normalised units. No colour changes: relative fluxes
  between pixels and bands are the signal.
- ``photo``: the recipe of DINO (Caron et al. 2021): crops, horizontal flip, colour jitter,
  grayscale, a blur whose probability depends on the view (1.0 / 0.1 / 0.5) and solarisation
  on the second global view. The colour operations are defined on pixel values in [0, 1], so
  they run on the un-normalised view (``x * std + mean``) and the result is normalised again.
  Only 3-channel images are RGB: for other channel counts only brightness and contrast (per
  channel) are jittered.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ssl4sci.ssl.crops import ContentAwareResizedCrop, SignalMap

DOMAINS = ("lensing", "photo")

AUGMENT_DEFAULTS = {
    "min_signal_fraction": 0.05,
    "signal_sigma": 3.0,
    "max_tries": 10,
    "keep_centre": None,  # None: True for lensing (the lens is at the centre), False for photos
    "zoom": None,  # None: False for lensing (views at native pixel scale), True for photos (RandomResizedCrop)
    "noise_std": 0.02,
    "blur_prob": 0.0,
    "color_jitter_prob": 0.8,
    "grayscale_prob": 0.2,
    "solarize_prob": 0.2,
}
"""Defaults of ``pretrain.augment`` (the workflow schema fills the same ones in)."""

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


class RandomRot90(torch.nn.Module):
    """Rotate by a random multiple of 90° (exact: no interpolation of the pixels)."""

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        k = int(torch.randint(0, 4, ()).item())
        return torch.rot90(img, k, dims=(-2, -1))


class GaussianNoise(torch.nn.Module):
    """Add N(0, std²) to every pixel (std in the units of the input)."""

    def __init__(self, std: float):
        super().__init__()
        self.std = std

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return img + self.std * torch.randn_like(img) if self.std > 0 else img


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


def _check_prob(aug: dict, key: str) -> None:
    if not 0 <= aug[key] <= 1:
        raise ValueError(f"config key 'pretrain.augment.{key}': expected a probability in [0, 1], got {aug[key]}")


class MultiCrop:
    """``[global_1, global_2, local_1, ..., local_n]`` views of one normalised image, plus crop statistics.

    ``cfg`` is the ``pretrain`` config section (``global_crop_size``, ``global_crop_scale``,
    ``local_crop_size``, ``local_crop_scale``, ``local_crops_number`` and the ``augment`` dict,
    see ``AUGMENT_DEFAULTS``); ``mean``/``std`` are the dataset's per-channel statistics the
    image was normalised with (needed to find the signal on the raw image and to apply colour
    operations in [0, 1] pixel space); ``domain`` is ``"lensing"`` or ``"photo"``.

    ``augment.keep_centre`` is honoured in both domains; None means True for lensing, False for
    photos. ``photo_blur_probs`` overrides DINO's per-view blur probabilities (global 1,
    global 2, local); it is not a config key, the recipe is fixed, but tests and ablations need it.

    Calling returns ``{"views": [...], "crops": 2 + n_local, "crop_rejects": total rejected
    candidate boxes}``; the default collate turns it into a list of (B, C, h, w) tensors and two
    LongTensors (B,), so the training loop can log how often crops land on empty sky.
    """

    def __init__(self, cfg: dict, mean: Sequence[float], std: Sequence[float], domain: str,
                 *, photo_blur_probs: Sequence[float] = PHOTO_BLUR_PROBS):
        if domain not in DOMAINS:
            raise ValueError(f"config key 'pretrain.augment.domain': expected one of {', '.join(DOMAINS)}, got {domain!r}")
        self.domain = domain
        aug = {**AUGMENT_DEFAULTS, **{k: v for k, v in (cfg.get("augment") or {}).items() if v is not None}}
        for key in ("blur_prob", "color_jitter_prob", "grayscale_prob", "solarize_prob"):
            _check_prob(aug, key)
        if aug["noise_std"] < 0:
            raise ValueError(f"config key 'pretrain.augment.noise_std': expected >= 0, got {aug['noise_std']}")
        self.aug = aug
        self.keep_centre = bool(aug["keep_centre"] if aug["keep_centre"] is not None else domain == "lensing")
        # Lensing views keep the pixel scale by default: zooming would teach invariance to the Einstein radius.
        self.zoom = bool(aug["zoom"] if aug["zoom"] is not None else domain == "photo")
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

        def crop(size_key: str, scale_key: str) -> ContentAwareResizedCrop:
            return ContentAwareResizedCrop(cfg[size_key], cfg[scale_key], min_signal_fraction=aug["min_signal_fraction"],
                                           max_tries=aug["max_tries"], keep_centre=self.keep_centre, sigma=aug["signal_sigma"],
                                           zoom=self.zoom)

        self.global_crop = crop("global_crop_size", "global_crop_scale")
        self.local_crop = crop("local_crop_size", "local_crop_scale")
        self._rot90 = RandomRot90()
        self._noise = GaussianNoise(aug["noise_std"])
        self._jitter = v2.ColorJitter(**JITTER)

    def __repr__(self) -> str:
        return f"MultiCrop(domain={self.domain!r}, global={self.global_crop}, local={self.local_crop} x {self.n_local})"

    def __call__(self, img: torch.Tensor) -> dict:
        if img.ndim != 3 or img.shape[0] != self.mean.shape[0]:
            raise ValueError(f"MultiCrop: expected an image ({self.mean.shape[0]}, H, W) matching the dataset statistics, "
                             f"got shape {tuple(img.shape)}")
        # One signal map per image, from the raw values, shared by all views.
        signal = SignalMap.from_image(img * self.std + self.mean, self.aug["signal_sigma"])
        views, rejects = [], 0
        for i in range(2 + self.n_local):
            crop = self.global_crop if i < 2 else self.local_crop
            view, n_rejected = crop(img, signal)
            rejects += n_rejected
            views.append(self._lensing(view) if self.domain == "lensing" else self._photo(view, i))
        return {"views": views, "crops": len(views), "crop_rejects": rejects}

    def _lensing(self, view: torch.Tensor) -> torch.Tensor:
        """Flips, 90° rotation, optional blur, noise: the dihedral group plus the detector, nothing else."""
        if _coin(0.5):
            view = view.flip(-1)
        if _coin(0.5):
            view = view.flip(-2)
        view = self._rot90(view)
        if _coin(self.aug["blur_prob"]):
            view = random_blur(view, LENSING_BLUR_SIGMA)
        return self._noise(view)

    def _photo(self, view: torch.Tensor, index: int) -> torch.Tensor:
        """DINO's photometric chain for view ``index`` (0, 1: global; >= 2: local), in [0, 1] pixel space."""
        if _coin(0.5):
            view = view.flip(-1)
        x = view * self.std + self.mean
        rgb = x.shape[0] == 3
        if _coin(self.aug["color_jitter_prob"]):
            x = self._jitter(x) if rgb else brightness_contrast(x, JITTER["brightness"], JITTER["contrast"])
        if rgb and _coin(self.aug["grayscale_prob"]):
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        if _coin(self.photo_blur_probs[min(index, 2)]):
            x = random_blur(x, PHOTO_BLUR_SIGMA)
        if index == 1 and _coin(self.aug["solarize_prob"]):
            x = TF.solarize(x, threshold=SOLARIZE_THRESHOLD)
        return (x - self.mean) / self.std
