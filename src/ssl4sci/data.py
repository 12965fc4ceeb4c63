"""Reading prepared data: manifest + memory-mapped shards, normalised with stats.json.

The manifest's ``split`` is one of :data:`LABELLED_SPLITS` or :data:`UNLABELLED` (the pool only pretraining reads).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from ssl4sci.io import read_json

# the seeded, stratified splits: every stage after pretraining reads only these
LABELLED_SPLITS = ("train", "val", "test")
UNLABELLED = "unlabelled"  # the split of the pretraining-only pool (no label: label "", label_id -1)


def seeded_subset(rows: pd.DataFrame, limit: int, seed: int) -> pd.DataFrame:
    """``rows`` when there are at most ``limit``, else a seeded random ``limit`` of them, in manifest order."""
    if len(rows) <= limit:
        return rows
    return rows.sample(n=limit, random_state=seed).sort_index()



def raw_pixels(stored: torch.Tensor) -> torch.Tensor:
    """Stored pixel values as the float32 "raw" values every stage works from: uint8 scaled to [0, 1], other dtypes
    converted as they are. A new tensor (in place after the one allocation), on the input's device."""
    raw = stored.to(torch.float32, copy=True)
    return raw.div_(255.0) if stored.dtype == torch.uint8 else raw


def shard_file(shards_dir: str | Path, shard_id: int) -> Path:
    """``<shards_dir>/shard-NNNNN.npy``: the one spelling of a shard's file name, for the writers and the reader."""
    return Path(shards_dir) / f"shard-{int(shard_id):05d}.npy"

class PreparedData:
    """The output of the prepare stage, opened for reading."""

    def __init__(self, data_dir: str | Path):
        self.dir = Path(data_dir)
        for name in ("manifest.parquet", "stats.json", "shards"):
            if not (self.dir / name).exists():
                raise FileNotFoundError(f"{self.dir / name}: missing; expected the output of the prepare stage")
        self.manifest = pd.read_parquet(self.dir / "manifest.parquet")
        self.stats = read_json(self.dir / "stats.json")
        self.classes: list[str] = list(self.stats["classes"])
        self._shards: dict[int, np.ndarray] = {}
        self._masks: dict[int, np.ndarray] = {}
        self.mean = torch.tensor(self.stats["mean"], dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(self.stats["std"], dtype=torch.float32).view(-1, 1, 1)
        self.uint8 = self.stats["dtype"] == "uint8"

    @property
    def channels(self) -> int:
        return int(self.stats["channels"])

    @property
    def image_size(self) -> int:
        return int(self.stats["image_size"])

    def rows(self, splits: Sequence[str] | None = None) -> pd.DataFrame:
        if splits is None:
            return self.manifest
        return self.manifest[self.manifest["split"].isin(list(splits))]

    def _shard(self, shard: int) -> np.ndarray:
        if shard not in self._shards:
            # Memory-mapped: workers share the page cache, nothing is copied up front.
            self._shards[shard] = np.load(shard_file(self.dir / "shards", shard), mmap_mode="r")
        return self._shards[shard]

    def raw_image(self, shard: int, index: int) -> torch.Tensor:
        """The stored image as float32 in [0, 1]-ish units (before normalisation)."""
        img = torch.from_numpy(np.asarray(self._shard(shard)[index], dtype=np.float32))
        return img / 255.0 if self.uint8 else img  # as raw_pixels, converting the memory map's image in one copy

    def stored_images(self, shards: np.ndarray, indices: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The images at (``shards[i]``, ``indices[i]``), in that order, as stored: dtype kept (uint8 stays uint8),
        not scaled or normalised; written into ``out`` when given.

        One fancy-indexed read per shard, not one per image: numpy releases the GIL for the whole copy, so reader
        threads overlap with each other and with a main thread that is busy in Python."""
        if len(shards) == 0:
            dtype = np.dtype(self.stats["dtype"])
            return np.empty((0, self.channels, self.image_size, self.image_size), dtype) if out is None else out
        groups = np.unique(shards)
        if len(groups) == 1 and out is None:
            return self._shard(int(groups[0]))[indices]  # the common case: one read, no second copy
        for shard in groups:
            chosen = shards == shard
            images = self._shard(int(shard))[indices[chosen]]
            if out is None:
                out = np.empty((len(shards),) + images.shape[1:], images.dtype)
            if len(groups) == 1:
                out[...] = images
            else:
                out[chosen] = images
        return out

    def normalise(self, img: torch.Tensor) -> torch.Tensor:
        return (img - self.mean) / self.std

    def mask(self, shard: int, index: int) -> np.ndarray | None:
        path = self.dir / "shards" / f"mask-{shard:05d}.npy"
        if not path.exists():
            return None
        if shard not in self._masks:
            self._masks[shard] = np.load(path, mmap_mode="r")
        return np.asarray(self._masks[shard][index], dtype=bool)

    def __getstate__(self):
        # Memory maps are reopened in each DataLoader worker rather than pickled.
        state = self.__dict__.copy()
        state["_shards"], state["_masks"] = {}, {}
        return state


class ImageDataset(Dataset):
    """Rows of the manifest as (normalised image, label_id, extra target) with an optional transform.

    ``raw=True`` hands the transform the stored values before normalisation instead (a transform that normalises
    last, like pretraining's multi-crop).
    """

    def __init__(self, data: PreparedData, rows: pd.DataFrame, transform=None, target: str | None = None,
                 normalise=None, raw: bool = False):
        self.data = data
        # A public model expects its own input statistics instead of the dataset's.
        self.normalise = normalise or data.normalise
        self.raw = raw
        self.shard = rows["shard"].to_numpy()
        self.index = rows["index"].to_numpy()
        self.label = rows["label_id"].to_numpy()
        self.target = rows[target].to_numpy(dtype=np.float32) if target else None
        self.transform = transform

    def __len__(self) -> int:
        return len(self.shard)

    def __getitem__(self, i: int):
        img = self.data.raw_image(int(self.shard[i]), int(self.index[i]))
        if not self.raw:
            img = self.normalise(img)
        if self.transform is not None:
            img = self.transform(img)
        if self.target is not None:
            return img, int(self.label[i]), float(self.target[i])
        return img, int(self.label[i])


class StoredBatches(Dataset):
    """Rows of the manifest in consecutive batches of stored images (dtype as stored, not normalised): one read per
    shard and batch, and the conversion to normalised float32 left to the device (``features.device_normaliser``), so
    a uint8 batch crosses to the GPU in a quarter of the bytes. ``pin_memory``: each batch lands in page-locked memory,
    ready for an asynchronous copy to a GPU (needs CUDA)."""

    def __init__(self, data: PreparedData, rows: pd.DataFrame, batch_size: int, pin_memory: bool = False):
        self.data = data
        self.batch_size = int(batch_size)
        self.pin_memory = pin_memory
        self.shard = rows["shard"].to_numpy()
        self.index = rows["index"].to_numpy()

    def __len__(self) -> int:
        return -(-len(self.shard) // self.batch_size)

    def __getitem__(self, batch: int) -> torch.Tensor:
        if not 0 <= batch < len(self):
            raise IndexError(f"batch {batch} of {len(self)}")
        rows = slice(batch * self.batch_size, (batch + 1) * self.batch_size)
        shards, indices = self.shard[rows], self.index[rows]
        if not self.pin_memory:
            return torch.from_numpy(self.data.stored_images(shards, indices))
        # Page-locked buffers come from torch's caching host allocator: reused, so no page faults after the first.
        stored = self.data._shard(int(shards[0]))
        out = torch.empty((len(shards),) + stored.shape[1:], dtype=torch.from_numpy(np.empty(0, stored.dtype)).dtype,
                          pin_memory=True)
        self.data.stored_images(shards, indices, out=out.numpy())
        return out


class StoredRows(Dataset):
    """``rows``' stored images (dtype as stored, not normalised) in batches picked by row positions, for a
    ``DataLoader(..., batch_size=None, sampler=BatchSampler(...))``: one read per shard and batch, the conversion left
    to the device (pretraining's ``DeviceViews``), as :class:`StoredBatches` does for consecutive rows."""

    def __init__(self, data: PreparedData, rows: pd.DataFrame):
        self.data, self.shard, self.index = data, rows["shard"].to_numpy(), rows["index"].to_numpy()

    def __len__(self) -> int:
        return len(self.shard)

    def __getitem__(self, positions: list[int]) -> torch.Tensor:
        positions = np.asarray(positions)
        return torch.from_numpy(self.data.stored_images(self.shard[positions], self.index[positions]))
