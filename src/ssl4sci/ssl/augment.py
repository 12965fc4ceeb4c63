"""Multi-crop views for self-supervised training on normalised tensors (any channel count).

Lensing images are physical measurements: geometry-only augmentations (crops, flips,
90° rotations), blur and Gaussian noise; no colour jitter.
"""
from __future__ import annotations

import torch
from torchvision.transforms import v2


def _lensing_view(size: int, scale: tuple[float, float], noise_std: float, blur_prob: float) -> v2.Compose:
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=tuple(scale), ratio=(3 / 4, 4 / 3), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            RandomRot90(),
            v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=(0.1, 1.5))], p=blur_prob),
            GaussianNoise(noise_std),
        ]
    )


class RandomRot90(torch.nn.Module):
    """Rotate by a random multiple of 90° (exact: no interpolation of the pixels)."""

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        k = int(torch.randint(0, 4, ()).item())
        return torch.rot90(img, k, dims=(-2, -1))


class GaussianNoise(torch.nn.Module):
    def __init__(self, std: float):
        super().__init__()
        self.std = std

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return img + self.std * torch.randn_like(img) if self.std > 0 else img


class MultiCrop:
    """Return [global_1, global_2, local_1, ..., local_n] views of one image."""

    def __init__(self, cfg: dict):
        self.global_view = _lensing_view(cfg["global_crop_size"], cfg["global_crop_scale"], cfg["noise_std"], cfg["blur_prob"])
        self.local_view = _lensing_view(cfg["local_crop_size"], cfg["local_crop_scale"], cfg["noise_std"], cfg["blur_prob"])
        self.n_local = cfg["local_crops_number"]

    def __call__(self, img: torch.Tensor) -> list[torch.Tensor]:
        return [self.global_view(img), self.global_view(img)] + [self.local_view(img) for _ in range(self.n_local)]
