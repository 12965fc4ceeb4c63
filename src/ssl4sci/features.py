"""Features of a dataset's images through a frozen backbone: what the embed stage writes and what the pretraining
monitor scores between epochs, computed the same way (eval mode, bf16 autocast on GPU, float32 out).

:func:`batched_features` is the one forward loop both use: each batch is copied to the device (``non_blocking``, so a
batch in pinned memory overlaps the work already queued), converted and normalised there when asked
(:func:`device_normaliser`), and its features are handed back only once the next batch has been queued, so the device
does not wait while the host writes them out.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from ssl4sci.data import raw_pixels
from ssl4sci.models import embed_dim

ImageFn = Callable[[torch.Tensor], torch.Tensor]


def device_normaliser(mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor,
                      device: torch.device) -> ImageFn:
    """A function from a batch of stored images on ``device`` to normalised float32 images there.

    The same operations ``ImageDataset`` applies per image on the host (uint8 divided by 255, then ``(x - mean) / std``
    per channel), so the result is the same float32 numbers; only the batch crosses to the device in its stored dtype.
    """
    mean = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1).to(device)
    std = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1).to(device)

    def normalise(images: torch.Tensor) -> torch.Tensor:
        # One new tensor, then in place: a large batch costs one allocation, not four (it shows on a CPU).
        return raw_pixels(images).sub_(mean).div_(std)

    return normalise


def _copy_to_host(features: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start copying ``features`` to the host as float32; on CUDA the copy is asynchronous, with an event to wait on."""
    host = features.float().to("cpu", non_blocking=features.is_cuda)
    if not features.is_cuda:
        return host, None
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(features.device))
    return host, done


def _wait(copy: tuple[torch.Tensor, torch.cuda.Event | None]) -> np.ndarray:
    host, done = copy
    if done is not None:
        done.synchronize()
    return host.numpy()


@torch.no_grad()
def batched_features(backbone: torch.nn.Module, batches: Iterable[torch.Tensor], device: torch.device,
                     prepare: ImageFn | None = None) -> Iterator[np.ndarray]:
    """(n, embed_dim) float32 features of each batch of images (host tensors), in order.

    ``prepare`` runs on the device before the forward (e.g. :func:`device_normaliser`). ``backbone`` is moved to
    ``device`` in eval mode; a backbone compiled in place (``runtime.compile_in_place``) runs compiled.
    """
    backbone.to(device).eval()
    pending = None
    for images in batches:
        images = images.to(device, non_blocking=True)
        if prepare is not None:
            images = prepare(images)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            features = backbone(images)
        queued = _copy_to_host(features)
        if pending is not None:
            yield _wait(pending)  # the batch before, while this one runs on the device
        pending = queued
    if pending is not None:
        yield _wait(pending)


def extract_features(backbone: torch.nn.Module, dataset, batch_size: int, device: torch.device,
                     num_workers: int = 0, prepare: ImageFn | None = None) -> np.ndarray:
    """(N, embed_dim) float32 features of every image of ``dataset`` (items ``(image, ...)``), in dataset order, in
    memory; leaves ``backbone`` in eval mode on ``device``."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    feats = list(batched_features(backbone, (batch[0] for batch in loader), device, prepare))
    return np.concatenate(feats) if feats else np.zeros((0, embed_dim(backbone)), np.float32)
