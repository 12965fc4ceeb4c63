"""Content-aware random-resized crops for a whole batch at once: boxes of (almost) only background are redrawn.

Why: a strong-lensing image is mostly empty sky around a small lens and its arcs, so a plain
RandomResizedCrop at small scales often returns a view of pure noise. Such a view carries no
information about the object, and the student/teacher pair can only match it by memorising
noise. Here candidate boxes are scored by the share of *signal* pixels they contain and the
blank ones are redrawn.

Every piece works on a batch (B, C, H, W) as tensor operations on the batch's device, with no per-image Python loop
and no host synchronisation, so the same code cuts views in a CPU loader worker and on a GPU:

- :func:`signal_mask` marks the pixels that stand out of each image's own background, with a
  robust (median / MAD) estimate of that background, so no per-dataset threshold is needed.
- :class:`SignalMap` holds the masks and their summed-area tables (integral images). A table is
  built once per image; afterwards the signal fraction of any number of boxes costs four
  look-ups each, all boxes of all images in one gather.
- :func:`sample_boxes` draws candidate boxes like torchvision's RandomResizedCrop (area fraction
  uniform in ``scale``, log-uniform aspect ratio), optionally forced to contain the centre pixel.
- :class:`ContentAwareResizedCrop` draws ``max_tries`` candidates per view, keeps the first with
  enough signal (else the best one), and :func:`crop_boxes` cuts and resizes every chosen box of the batch at once,
  with the antialiased bilinear filter of ``F.interpolate`` written as two batched matrix products.

All randomness goes through torch's RNG of the batch's device (an optional ``torch.Generator``), so
``torch.manual_seed`` makes the crops reproducible, also in DataLoader workers.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

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
    """Boolean mask (..., H, W) of the pixels where any channel exceeds its background by ``sigma`` noise units.

    ``raw`` is one un-normalised image (C, H, W) or a batch (B, C, H, W). Background is the per-image, per-channel
    median, noise is ``1.4826 * MAD`` (floored at ``NOISE_FLOOR`` x the channel's dynamic range). Both are robust: a
    lens and its arcs cover a minority of pixels and barely move them. The test is one-sided (brighter than the
    background) because the signal in the images this was made for is emission on dark sky.

    The result is unchanged by any per-channel ``a * x + b`` with ``a > 0`` (up to rounding), so a normalised image
    gives the same mask; taking the raw one simply avoids depending on that.
    """
    if raw.ndim not in (3, 4):
        raise ValueError(f"signal_mask: expected an image (C, H, W) or a batch (B, C, H, W), got shape "
                         f"{tuple(raw.shape)}")
    x = raw.detach().to(torch.float32).flatten(-2)
    background = x.median(dim=-1, keepdim=True).values
    excess = x - background
    noise = MAD_TO_SIGMA * excess.abs().median(dim=-1, keepdim=True).values
    span = x.amax(dim=-1, keepdim=True) - x.amin(dim=-1, keepdim=True)
    noise = torch.maximum(noise, NOISE_FLOOR * span)
    # Strict '>': with noise 0 (constant channel) nothing qualifies.
    return (excess > sigma * noise).any(dim=-2).view(*raw.shape[:-3], *raw.shape[-2:])


class SignalMap:
    """Signal masks and their summed-area tables: built once per image, then score any number of boxes.

    ``mask`` is (H, W) for one image or (B, H, W) for a batch; the tables are (B, H + 1, W + 1) with a zero first row
    and column, so the count inside rows [t, t + h) and columns [l, l + w) is
    ``T[t+h, l+w] - T[t, l+w] - T[t+h, l] + T[t, l]``.
    """

    def __init__(self, mask: torch.Tensor):
        if mask.ndim not in (2, 3):
            raise ValueError(f"SignalMap: expected a mask (H, W) or masks (B, H, W), got shape {tuple(mask.shape)}")
        self.mask = mask.to(torch.bool)
        masks = self.mask if mask.ndim == 3 else self.mask[None]
        b, h, w = masks.shape
        # int32 on the device: exact for images up to 2^31 pixels, and half the memory of int64
        self.table = torch.zeros((b, h + 1, w + 1), dtype=torch.int32, device=masks.device)
        self.table[:, 1:, 1:] = masks.to(torch.int32).cumsum(1).cumsum(2)

    @classmethod
    def from_image(cls, raw: torch.Tensor, sigma: float) -> "SignalMap":
        """The map of :func:`signal_mask` of the (un-normalised) image (C, H, W) or batch (B, C, H, W) ``raw``."""
        return cls(signal_mask(raw, sigma))

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of the images."""
        return tuple(self.mask.shape[-2:])

    def __len__(self) -> int:
        return self.table.shape[0]

    def fractions(self, boxes: torch.Tensor) -> torch.Tensor:
        """Share of signal pixels (float32) in boxes (B, ..., 4) of (top, left, height, width), box [b, ...] on image
        b; for a single-image map the boxes may be (K, 4)."""
        if self.mask.ndim == 2 and boxes.ndim == 2:
            return self.fractions(boxes[None])[0]
        top, left, height, width = boxes.long().unbind(-1)
        image = torch.arange(len(self), device=boxes.device).view(-1, *[1] * (top.ndim - 1))
        bottom, right = top + height, left + width
        t = self.table
        counts = t[image, bottom, right] - t[image, top, right] - t[image, bottom, left] + t[image, top, left]
        return counts.to(torch.float32) / (height * width).to(torch.float32)


def sample_boxes(n: int, height: int, width: int, scale: Sequence[float], ratio: Sequence[float] = (3 / 4, 4 / 3),
                 keep_centre: bool = False, generator: torch.Generator | None = None,
                 side: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
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
    def uniform() -> torch.Tensor:
        return torch.rand(n, generator=generator, dtype=torch.float64, device=device)

    if side is not None:
        h = torch.full((n,), min(int(side), height), dtype=torch.long, device=device)
        w = torch.full((n,), min(int(side), width), dtype=torch.long, device=device)
        return _place_boxes(h, w, height, width, keep_centre, uniform)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * uniform())
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    r = torch.exp(log_lo + (log_hi - log_lo) * uniform())
    # w = sqrt(A r) <= W and h = sqrt(A / r) <= H  <=>  A / H^2 <= r <= W^2 / A (non-empty since A <= H W).
    r = torch.minimum(torch.maximum(r, area / height**2), width**2 / area)
    w = torch.sqrt(area * r).round().long().clamp(1, width)
    h = torch.sqrt(area / r).round().long().clamp(1, height)
    return _place_boxes(h, w, height, width, keep_centre, uniform)


def _place_boxes(h: torch.Tensor, w: torch.Tensor, height: int, width: int, keep_centre: bool,
                 uniform) -> torch.Tensor:
    """Uniform positions for boxes of the given sides (containing the centre pixel with ``keep_centre``)."""
    if keep_centre:
        cy, cx = height // 2, width // 2
        top_lo, top_hi = (cy - h + 1).clamp(min=0), torch.clamp(height - h, max=cy)
        left_lo, left_hi = (cx - w + 1).clamp(min=0), torch.clamp(width - w, max=cx)
    else:
        top_lo, top_hi = torch.zeros_like(h), height - h
        left_lo, left_hi = torch.zeros_like(w), width - w
    top = _uniform_int(top_lo, top_hi, uniform())
    left = _uniform_int(left_lo, left_hi, uniform())
    return torch.stack([top, left, h, w], dim=1)


def _uniform_int(lo: torch.Tensor, hi: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One integer uniform in [lo, hi] (inclusive) per element, from uniforms ``u`` in [0, 1)."""
    return torch.minimum(lo + (u * (hi - lo + 1)).floor().long(), hi)


def resize_weights(starts: torch.Tensor, lengths: torch.Tensor, in_size: int, size: int) -> torch.Tensor:
    """(K, size, in_size) weights that resize the spans [start, start + length) of an axis of ``in_size`` pixels to
    ``size`` pixels: antialiased bilinear, the filter of ``F.interpolate(..., mode="bilinear", antialias=True)``
    applied to the span alone (its edges clamp; nothing outside the span is read).

    Output pixel i of a span has its centre at ``scale (i + 0.5)`` (scale = length / size) and reads the span's
    pixels within ``max(scale, 1)`` of it, each weighted by a triangle of that half-width, normalised to sum 1.
    """
    starts, lengths = starts.to(torch.float64)[:, None, None], lengths.to(torch.float64)[:, None, None]
    scale = lengths / size
    support = torch.clamp(scale, min=1.0)
    centre = scale * (torch.arange(size, dtype=torch.float64, device=starts.device)[None, :, None] + 0.5)
    lowest = torch.clamp(torch.trunc(centre - support + 0.5), min=0)
    highest = torch.minimum(torch.trunc(centre + support + 0.5), lengths)
    position = torch.arange(in_size, dtype=torch.float64, device=starts.device)[None, None, :] - starts
    inside = (position >= lowest) & (position < highest)
    weights = torch.clamp(1 - ((position - centre + 0.5) / support).abs(), min=0) * inside
    return (weights / weights.sum(dim=-1, keepdim=True)).to(torch.float32)


def crop_boxes(images: torch.Tensor, boxes: torch.Tensor, size: int, exact_size: bool = False) -> torch.Tensor:
    """Every box of every image cut and resized to ``size`` x ``size``: (V, B, C, size, size) for ``images``
    (B, C, H, W) and ``boxes`` (B, V, 4) of (top, left, height, width).

    The resize is the box alone through ``F.interpolate(mode="bilinear", antialias=True)``, for all boxes at once as
    two batched matrix products (:func:`resize_weights`). ``exact_size``: the caller guarantees that every box is
    ``size`` x ``size``; its pixels are then gathered as they are, with no arithmetic at all.
    """
    b, v = boxes.shape[:2]
    if not images.is_floating_point():
        images = images.to(torch.float32)
    top, left, height, width = boxes.unbind(-1)  # each (B, V)
    if exact_size:
        offsets = torch.arange(size, device=boxes.device)
        rows = (top[..., None] + offsets)[..., :, None]  # (B, V, size, 1)
        cols = (left[..., None] + offsets)[..., None, :]  # (B, V, 1, size)
        image = torch.arange(b, device=boxes.device).view(b, 1, 1, 1)
        out = images.permute(0, 2, 3, 1)[image, rows, cols]  # (B, V, size, size, C)
        return out.permute(1, 0, 4, 2, 3).contiguous()
    h, w = images.shape[-2:]
    rows = resize_weights(top.reshape(-1), height.reshape(-1), h, size).view(b, v, size, h)
    cols = resize_weights(left.reshape(-1), width.reshape(-1), w, size).view(b, v, size, w)
    out = torch.einsum("bvsh,bchw->bvcsw", rows.to(images.dtype), images)
    out = torch.einsum("bvcsw,bvtw->vbcst", out, cols.to(images.dtype))
    return out.contiguous()


class ContentAwareResizedCrop:
    """RandomResizedCrop that redraws boxes showing (almost) only background, for a batch of images at once.

    Call as ``crop(images, signal, views) -> (crops, n_rejected)``:

    - ``images`` (B, C, H, W) is the batch to cut: the raw one, which the multi-crop normalises last;
    - ``signal`` says where the content is: a :class:`SignalMap` of the batch (build it once with
      ``SignalMap.from_image(raw_images, sigma)`` and reuse it for every view), or None to compute it from
      ``images`` with this crop's ``sigma``;
    - ``crops`` (views, B, C, size, size) are the chosen boxes resized (:func:`crop_boxes`);
    - ``n_rejected`` (B, views) counts the candidates examined and rejected before the accepted one
      (``max_tries - 1`` when none had enough signal: the best one is then used anyway, so a view
      is always returned, and every box drawn is either the view or a rejection). Logged, it tells
      whether ``scale`` and ``min_signal_fraction`` fit the data.

    ``max_tries`` candidates are drawn per view (see :func:`sample_boxes`) and scored together;
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

    def select_boxes(self, signal: SignalMap, views: int = 1,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose ``views`` boxes per image of ``signal``: boxes (B, views, 4) of (top, left, height, width) and the
        rejections (B, views) before each (see the class docstring)."""
        height, width = signal.shape
        n, tries = len(signal), self.max_tries
        boxes = sample_boxes(n * views * tries, height, width, self.scale, self.ratio, self.keep_centre, generator,
                             side=None if self.zoom else self.size, device=signal.table.device)
        boxes = boxes.view(n, views, tries, 4)
        if self.min_signal_fraction <= 0:
            return boxes[:, :, 0], torch.zeros((n, views), dtype=torch.long, device=boxes.device)
        fractions = signal.fractions(boxes)  # (B, views, tries)
        passing = fractions >= self.min_signal_fraction
        first_passing = passing.to(torch.uint8).argmax(dim=-1)  # argmax returns the first of equal maxima
        best = fractions.argmax(dim=-1)
        any_passing = passing.any(dim=-1)
        chosen = torch.where(any_passing, first_passing, best)
        # None passed: the best is used, the other tries - 1 were rejected.
        rejected = torch.where(any_passing, first_passing, torch.full_like(best, tries - 1))
        return boxes.gather(2, chosen[..., None, None].expand(n, views, 1, 4))[:, :, 0], rejected

    def select(self, signal: SignalMap,
               generator: torch.Generator | None = None) -> tuple[tuple[int, int, int, int], int]:
        """One box for a single-image map: ``((top, left, height, width), n_rejected)``."""
        if len(signal) != 1:
            raise ValueError(f"ContentAwareResizedCrop.select: expected the map of one image, got {len(signal)}")
        boxes, rejected = self.select_boxes(signal, 1, generator)
        return tuple(boxes[0, 0].tolist()), int(rejected[0, 0])

    def __call__(self, images: torch.Tensor, signal: SignalMap | torch.Tensor | None = None, views: int = 1,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if images.ndim != 4:
            raise ValueError(f"ContentAwareResizedCrop: expected a batch (B, C, H, W), got shape {tuple(images.shape)}")
        if signal is None:
            signal = SignalMap.from_image(images, self.sigma)
        elif not isinstance(signal, SignalMap):
            signal = SignalMap(signal)
        if signal.shape != tuple(images.shape[-2:]) or len(signal) != len(images):
            raise ValueError(f"ContentAwareResizedCrop: signal map of {len(signal)} x {signal.shape} does not match "
                             f"the images {tuple(images.shape)}")
        boxes, rejected = self.select_boxes(signal, views, generator)
        exact = not self.zoom and self.size <= min(signal.shape)  # size x size boxes: a gather, no resampling
        return crop_boxes(images, boxes, self.size, exact_size=exact), rejected
