"""Embed stage: every image of the train, val and test splits through a backbone, into Parquet with provenance
metadata. The unlabelled pool (pretraining only) is never embedded, so no later stage can score it.

Built for inference speed: the loader hands whole batches as stored (uint8 stays uint8 across the copy to the
device), the device converts and normalises them, and each batch's rows are appended to the Parquet file as they
finish, under a temporary name renamed into place at the end, so nothing half-written appears if the stage fails.
"""
from __future__ import annotations

import contextlib
import copy
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from ssl4sci.data import LABELLED_SPLITS, PreparedData, StoredBatches
from ssl4sci.features import batched_features, device_normaliser
from ssl4sci.io import streaming_parquet
from ssl4sci.models import backbone_family, embed_dim, load_backbone, pick_device
from ssl4sci.probes import EMBEDDING_COLUMN
from ssl4sci.runtime import compile_in_place, setup_process


def embed_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """The ``embed`` section with the schema's defaults filled in (a caller may pass only the keys it sets)."""
    from ssl4sci.config import validate_config

    return validate_config({"embed": copy.deepcopy(dict(cfg))})["embed"]


def _backbone(method: str, checkpoint: str | Path | None, model_cfg: dict[str, Any], data: PreparedData, seed: int,
              timm: dict[str, Any] | None) -> tuple[torch.nn.Module, dict[str, Any], tuple[Any, Any], str]:
    """(backbone, provenance, the (mean, std) its inputs are normalised with, what its feature is)."""
    if timm:
        from ssl4sci.baselines import baseline_normalisation, load_timm_baseline

        backbone, provenance = load_timm_baseline(timm["name"], timm.get("weights"), data.channels, data.image_size)
        provenance["method"] = method
        # A public model expects its own input statistics instead of the dataset's.
        return (backbone, provenance, baseline_normalisation(backbone, data.channels),
                "the model's pooled pre-logits feature")
    backbone, provenance = load_backbone(method, checkpoint, model_cfg, data.channels, data.image_size, seed=seed)
    if backbone_family(backbone) in ("swin", "cnn"):
        feature = "average-pooled last stage (pre-logits)"
    else:
        feature = "CLS token of the last block (pre-logits)"
    return backbone, provenance, (data.mean, data.std), feature


def stored_batches(data: PreparedData, rows: pd.DataFrame, batch_size: int, num_workers: int,
                   device: torch.device) -> Iterator[torch.Tensor]:
    """Batches of ``rows`` as stored (uint8 stays uint8), in order, read ahead by ``num_workers`` threads (0: each
    read here when asked); in page-locked memory for a CUDA device, so the copy to it is asynchronous.

    Threads rather than DataLoader processes: a batch read is one memory copy with the GIL released, and a batch a
    thread read needs no second copy through shared memory to reach this process (on the 2-core CPU, 2 threads read
    3-4x the images per second of 2 worker processes)."""
    batches = StoredBatches(data, rows, batch_size, pin_memory=device.type == "cuda")
    if num_workers == 0:
        yield from (batches[i] for i in range(len(batches)))
        return
    pool = ThreadPoolExecutor(num_workers, thread_name_prefix="ssl4sci-embed-read")
    try:
        pending = deque(pool.submit(batches.__getitem__, i) for i in range(min(len(batches), num_workers + 1)))
        submitted = len(pending)
        while pending:
            batch = pending.popleft().result()
            if submitted < len(batches):  # keep num_workers + 1 reads in flight while this batch is used
                pending.append(pool.submit(batches.__getitem__, submitted))
                submitted += 1
            yield batch
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def compile_backbone(backbone: torch.nn.Module, setting: bool | str, batch_shape: tuple[int, ...],
                     device: torch.device) -> bool:
    """``embed.compile`` (``setting``) applied to ``backbone`` in place, compiled now on a batch of zeros of the
    stage's shape through the stage's own loop; a compiler that fails leaves it eager with one line on stderr
    (``runtime.compile_in_place``). True when compiled."""
    backbone = backbone.to(device).eval()
    zeros = torch.zeros(batch_shape)
    return compile_in_place(backbone, setting, lambda: list(batched_features(backbone, [zeros], device)),
                            "embed.compile")


def write_embeddings(out_path: str | Path, backbone: torch.nn.Module, data: PreparedData, rows: pd.DataFrame,
                     cfg: dict[str, Any], device: torch.device, normalisation: tuple[Any, Any],
                     metadata: dict[str, Any], method: str, checkpoint: str | Path | None = None) -> Path:
    """Stream the embeddings of ``rows`` (manifest columns + a FixedSizeList ``embedding`` column, ``metadata`` and
    ``embed_dim`` as key-value metadata) to ``out_path``, batch by batch; the file appears only when all are in.

    ``cfg``: the filled-in ``embed`` section (batch_size, num_workers); ``normalisation``: the (mean, std) applied on
    the device. ``backbone`` runs as given: compiled when :func:`compile_backbone` compiled it."""
    backbone = backbone.to(device).eval()
    rows = rows.reset_index(drop=True)
    manifest = pa.Table.from_pandas(rows, preserve_index=False)
    dim = embed_dim(backbone)
    column = pa.field(EMBEDDING_COLUMN, pa.list_(pa.float32(), dim))
    batches = stored_batches(data, rows, cfg["batch_size"], cfg["num_workers"], device)
    normalise = device_normaliser(*normalisation, device)
    # closing: a failure stops the reader threads now, not when the traceback is collected
    with contextlib.closing(batches), \
            streaming_parquet(out_path, manifest.schema.append(column), {**metadata, "embed_dim": dim}) as out:
        for feats in batched_features(backbone, batches, device, normalise):
            if not np.isfinite(feats).all():  # raised inside the writer: the temporary file goes, no file appears
                raise FloatingPointError(f"{method}: non-finite embeddings; the checkpoint {checkpoint} is probably "
                                         "diverged")
            if feats.shape[1] != dim:
                raise ValueError(f"{method}: the backbone gives {feats.shape[1]} features per image, its num_features "
                                 f"says {dim}")
            values = pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), dim)
            out.write(manifest.slice(out.rows, len(feats)).append_column(column, values))
    return Path(out_path)


def embed(data_dir: str | Path, out_path: str | Path, method: str, checkpoint: str | Path | None,
          cfg: dict[str, Any], model_cfg: dict[str, Any], device: str = "auto", threads: int = 1,
          timm: dict[str, Any] | None = None) -> Path:
    """Embed every labelled image (train, val, test) with ``method``'s backbone; ``timm`` = {name, weights} embeds
    with a public timm model."""
    cfg = embed_settings(cfg)
    setup_process(threads, cfg["seed"])
    data = PreparedData(data_dir)
    backbone, provenance, normalisation, feature = _backbone(method, checkpoint, model_cfg, data, cfg["seed"], timm)
    # key order as before: provenance, image_size, embed_dim, feature
    metadata = {**provenance, "image_size": data.image_size, "embed_dim": embed_dim(backbone), "feature": feature}
    rows, dev = data.rows(LABELLED_SPLITS), pick_device(device)
    batch = max(1, min(cfg["batch_size"], len(rows)))
    compile_backbone(backbone, cfg["compile"], (batch, data.channels, data.image_size, data.image_size), dev)
    return write_embeddings(out_path, backbone, data, rows, cfg, dev, normalisation, metadata, method, checkpoint)
