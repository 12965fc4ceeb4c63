"""Content-aware random-resized crop: a RandomResizedCrop that rejects crops of (almost) only background.

Why: a strong-lensing image is mostly empty sky around a small lens and its arcs, so a plain
RandomResizedCrop at small scales often returns a view of pure noise. Such a view carries no
information about the object, and the student/teacher pair can only match it by memorising
noise. Here candidate boxes are scored by the share of *signal* pixels they contain and the
blank ones are redrawn.

The pieces, in the order they are used:

- :func:`signal_mask` marks the pixels that stand out of the image's own background, with a
  robust (median / MAD) estimate of that background, so no per-dataset threshold is needed.
- :class:`SignalMap` holds the mask and its summed-area table (integral image). The table is
  built once per image; afterwards the signal fraction of any number of boxes costs four
  look-ups each, all boxes in one vectorised expression.
- :func:`sample_boxes` draws candidate boxes like torchvision's RandomResizedCrop (area fraction
  uniform in ``scale``, log-uniform aspect ratio), optionally forced to contain the centre pixel.
- :class:`ContentAwareResizedCrop` draws ``max_tries`` candidates at once, keeps the first with
  enough signal (else the best one) and resizes it.

All randomness goes through torch's RNG (an optional ``torch.Generator``), so
``torch.manual_seed`` makes the crops reproducible, also in DataLoader workers.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

MAD_TO_SIGMA = 1.4826
"""MAD -> standard deviation for Gaussian noise: the MAD is robust to the signal pixels themselves."""

NOISE_FLOOR = 1e-3
"""Smallest noise level, as a fraction of a channel's dynamic range (max - min).

Why: a clean simulation has an exactly zero sky, so median and MAD are both 0 and every
pixel above 0 (even far-out numerical wings) would count as signal. With the floor, "signal"
means brighter than the background by ``sigma`` thousandths of the peak-to-background range.
A constant channel has range 0, hence floor 0, and ``x - background > 0`` never holds: no signal.
"""


def signal_mask(raw: torch.Tensor, sigma: float) -> torch.Tensor:
    """Boolean mask (H, W) of the pixels where any channel exceeds its background by ``sigma`` noise units.

    Background is the per-channel median, noise is ``1.4826 * MAD`` (floored at
    ``NOISE_FLOOR`` x the channel's dynamic range). Both are robust: a lens and its arcs
    cover a minority of pixels and barely move them. The test is one-sided (brighter than
    the background) because the signal in the images this was made for is emission on dark sky.

    ``raw`` should be the un-normalised image (C, H, W). The result is unchanged by any
    per-channel ``a * x + b`` with ``a > 0`` (up to rounding), so a normalised image gives the
    same mask; taking the raw one simply avoids depending on that.
    """
    if raw.ndim != 3:
        raise ValueError(f"signal_mask: expected an image (C, H, W), got shape {tuple(raw.shape)}")
    x = raw.detach().to(torch.float32).flatten(1)
    background = x.median(dim=1, keepdim=True).values
    excess = x - background
    noise = MAD_TO_SIGMA * excess.abs().median(dim=1, keepdim=True).values
    span = x.amax(dim=1, keepdim=True) - x.amin(dim=1, keepdim=True)
    noise = torch.maximum(noise, NOISE_FLOOR * span)
    # Strict '>': with noise 0 (constant channel) nothing qualifies.
    return (excess > sigma * noise).any(dim=0).view(raw.shape[1:])


def box_fractions(table: torch.Tensor, tops: torch.Tensor, lefts: torch.Tensor, heights: torch.Tensor,
                  widths: torch.Tensor) -> torch.Tensor:
    """Share of True mask pixels inside each of K boxes, from the summed-area ``table`` of the mask.

    ``table`` is (H + 1, W + 1) with a zero first row and column (see :meth:`SignalMap`), so the
    count inside rows [t, t + h) and columns [l, l + w) is
    ``T[t+h, l+w] - T[t, l+w] - T[t+h, l] + T[t, l]``: four gathers for all boxes at once.
    Returns float64 (K,); counts are exact integers, so the fractions equal a per-box mean.
    """
    tops, lefts, heights, widths = (torch.as_tensor(v, dtype=torch.long).reshape(-1)
                                    for v in (tops, lefts, heights, widths))
    bottoms, rights = tops + heights, lefts + widths
    counts = table[bottoms, rights] - table[tops, rights] - table[bottoms, lefts] + table[tops, lefts]
    return counts.to(torch.float64) / (heights * widths).to(torch.float64)


class SignalMap:
    """A signal mask and its summed-area table: built once per image, then scores any number of boxes.

    Why a class: the multi-crop transform makes ~10 views per image, each with ``max_tries``
    candidates; building the table once and reusing it keeps the per-candidate cost O(1).
    """

    def __init__(self, mask: torch.Tensor):
        if mask.ndim != 2:
            raise ValueError(f"SignalMap: expected a mask (H, W), got shape {tuple(mask.shape)}")
        self.mask = mask.to(torch.bool)
        h, w = self.mask.shape
        self.table = torch.zeros((h + 1, w + 1), dtype=torch.int64)
        self.table[1:, 1:] = self.mask.to(torch.int64).cumsum(0).cumsum(1)

    @classmethod
    def from_image(cls, raw: torch.Tensor, sigma: float) -> "SignalMap":
        """The map of :func:`signal_mask` of the (un-normalised) image ``raw`` (C, H, W)."""
        return cls(signal_mask(raw, sigma))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.mask.shape)

    def fractions(self, tops, lefts, heights, widths) -> torch.Tensor:
        """Signal fraction (float64, K) of K boxes given as tensors of tops, lefts, heights, widths."""
        return box_fractions(self.table, tops, lefts, heights, widths)


def sample_boxes(n: int, height: int, width: int, scale: Sequence[float], ratio: Sequence[float] = (3 / 4, 4 / 3),
                 keep_centre: bool = False, generator: torch.Generator | None = None,
                 side: int | None = None) -> torch.Tensor:
    """``n`` random boxes inside a ``height`` x ``width`` image, as a LongTensor (n, 4) of (top, left, height, width).

    As torchvision's RandomResizedCrop: area fraction uniform in ``scale``, aspect ratio
    (width / height) log-uniform in ``ratio``. Where a box of that area and ratio would not fit,
    the ratio is clamped to the nearest one that does, so the area fraction is exactly the one
    drawn and ``scale=(1, 1)`` gives the whole image (torchvision gets the same by falling back
    to a central crop after 10 misses). Sides are rounded and clipped to [1, image side].

    ``keep_centre``: the box contains the central pixel ``(height // 2, width // 2)``; top and
    left are uniform over the positions that keep it inside (why: in lensing the lens sits at
    the centre, and a view without it is a view of an arc fragment with no context).

    ``side``: every box is ``side`` x ``side`` pixels (clipped to the image) and only its position
    is random; ``scale`` and ``ratio`` are ignored. A view cut this way is not resized, so a pixel
    keeps its angular size (in lensing the Einstein radius in pixels is physics, not a nuisance).
    """
    if side is not None:
        h = torch.full((n,), min(int(side), height), dtype=torch.long)
        w = torch.full((n,), min(int(side), width), dtype=torch.long)
        return _place_boxes(h, w, height, width, keep_centre, generator)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, generator=generator, dtype=torch.float64))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    r = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n, generator=generator, dtype=torch.float64))
    # w = sqrt(A r) <= W and h = sqrt(A / r) <= H  <=>  A / H^2 <= r <= W^2 / A (non-empty since A <= H W).
    r = torch.minimum(torch.maximum(r, area / height**2), width**2 / area)
    w = torch.sqrt(area * r).round().long().clamp(1, width)
    h = torch.sqrt(area / r).round().long().clamp(1, height)
    return _place_boxes(h, w, height, width, keep_centre, generator)


def _place_boxes(h: torch.Tensor, w: torch.Tensor, height: int, width: int, keep_centre: bool,
                 generator: torch.Generator | None) -> torch.Tensor:
    """Uniform positions for boxes of the given sides (containing the centre pixel with ``keep_centre``)."""
    if keep_centre:
        cy, cx = height // 2, width // 2
        top_lo, top_hi = (cy - h + 1).clamp(min=0), torch.clamp(height - h, max=cy)
        left_lo, left_hi = (cx - w + 1).clamp(min=0), torch.clamp(width - w, max=cx)
    else:
        top_lo, top_hi = torch.zeros_like(h), height - h
        left_lo, left_hi = torch.zeros_like(w), width - w
    top = _uniform_int(top_lo, top_hi, generator)
    left = _uniform_int(left_lo, left_hi, generator)
    return torch.stack([top, left, h, w], dim=1)


def _uniform_int(lo: torch.Tensor, hi: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One integer uniform in [lo, hi] (inclusive) per element."""
    u = torch.rand(lo.shape, generator=generator, dtype=torch.float64)
    return torch.minimum(lo + (u * (hi - lo + 1)).floor().long(), hi)


def resized_crop(img: torch.Tensor, top: int, left: int, height: int, width: int, size: int) -> torch.Tensor:
    """``img[..., top:top+height, left:left+width]`` resized to ``size`` x ``size`` (bilinear, antialiased).

    A box already of the output size is copied, not interpolated, so the pixels stay exact.
    """
    patch = img[..., top:top + height, left:left + width]
    if (height, width) == (size, size):
        return patch.clone()
    if not patch.is_floating_point():
        patch = patch.to(torch.float32)
    batched = patch.reshape(-1, *patch.shape[-3:]) if patch.ndim >= 3 else patch[None, None]
    out = F.interpolate(batched, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.reshape(*patch.shape[:-2], size, size)


class ContentAwareResizedCrop:
    """RandomResizedCrop that redraws boxes showing (almost) only background.

    Call as ``crop(img, signal) -> (view, n_rejected)``:

    - ``img`` (C, H, W) is the image to cut: the raw one, which the multi-crop normalises last;
    - ``signal`` says where the content is: a :class:`SignalMap` (build it once per image with
      ``SignalMap.from_image(raw_image, sigma)`` and reuse it for every view), a boolean mask
      (H, W), or None to compute the mask from ``img`` itself with this crop's ``sigma``;
    - ``view`` is the chosen box resized to ``size`` x ``size`` (bilinear, antialiased);
    - ``n_rejected`` is how many candidates were examined and rejected before the accepted one
      (``max_tries - 1`` when none had enough signal: the best one is then used anyway, so a view
      is always returned, and every box drawn is either the view or a rejection). Logged, it tells
      whether ``scale`` and ``min_signal_fraction`` fit the data.

    ``max_tries`` candidates are drawn at once (see :func:`sample_boxes`) and scored together;
    the first with signal fraction >= ``min_signal_fraction`` wins. ``min_signal_fraction=0``
    turns the check off: the first candidate is always taken, as in a plain RandomResizedCrop.
    The keyword settings are those of ``pretrain.augment`` (``sigma`` is its ``signal_sigma``).
    """

    def __init__(self, size: int, scale: Sequence[float], ratio: Sequence[float] = (3 / 4, 4 / 3), *,
                 min_signal_fraction: float, max_tries: int, keep_centre: bool, sigma: float, zoom: bool):
        scale, ratio = tuple(float(s) for s in scale), tuple(float(r) for r in ratio)
        if int(size) < 1:
            raise ValueError(f"ContentAwareResizedCrop: size must be >= 1, got {size}")
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"ContentAwareResizedCrop: scale must be (lo, hi) with 0 < lo <= hi <= 1, got {scale}")
        if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ContentAwareResizedCrop: ratio must be (lo, hi) with 0 < lo <= hi, got {ratio}")
        if not 0 <= min_signal_fraction <= 1:
            raise ValueError(f"ContentAwareResizedCrop: min_signal_fraction must be in [0, 1], "
                             f"got {min_signal_fraction}")
        if int(max_tries) < 1:
            raise ValueError(f"ContentAwareResizedCrop: max_tries must be >= 1, got {max_tries}")
        self.size, self.scale, self.ratio = int(size), scale, ratio
        self.min_signal_fraction, self.max_tries = float(min_signal_fraction), int(max_tries)
        self.keep_centre, self.sigma = bool(keep_centre), float(sigma)
        self.zoom = bool(zoom)  # False: size x size boxes at the image's own pixel scale (see sample_boxes' side)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
                f"min_signal_fraction={self.min_signal_fraction}, max_tries={self.max_tries}, "
                f"keep_centre={self.keep_centre}, sigma={self.sigma}, zoom={self.zoom})")

    def select(self, signal: SignalMap,
               generator: torch.Generator | None = None) -> tuple[tuple[int, int, int, int], int]:
        """Choose a box: ``((top, left, height, width), n_rejected)`` (see the class docstring)."""
        height, width = signal.shape
        boxes = sample_boxes(self.max_tries, height, width, self.scale, self.ratio, self.keep_centre, generator,
                             side=None if self.zoom else self.size)
        if self.min_signal_fraction <= 0:
            return tuple(boxes[0].tolist()), 0
        fractions = signal.fractions(*boxes.unbind(1))
        passing = torch.nonzero(fractions >= self.min_signal_fraction)
        if len(passing):
            index = int(passing[0, 0])
            return tuple(boxes[index].tolist()), index
        # None passed: the best is used (argmax: first of the best), the other max_tries - 1 were rejected.
        return tuple(boxes[int(fractions.argmax())].tolist()), self.max_tries - 1

    def __call__(self, img: torch.Tensor, signal: SignalMap | torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
        if signal is None:
            signal = SignalMap.from_image(img, self.sigma)
        elif not isinstance(signal, SignalMap):
            signal = SignalMap(signal)
        if signal.shape != tuple(img.shape[-2:]):
            raise ValueError(f"ContentAwareResizedCrop: signal map {signal.shape} does not match the image "
                             f"{tuple(img.shape[-2:])}")
        (top, left, height, width), n_rejected = self.select(signal, generator)
        return resized_crop(img, top, left, height, width, self.size), n_rejected
