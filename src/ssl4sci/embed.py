"""Embed stage: every image of the train, val and test splits through a backbone, into Parquet with provenance
metadata. The unlabelled pool (pretraining only) is never embedded, so no later stage can score it."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from ssl4sci.data import LABELLED_SPLITS, ImageDataset, PreparedData
from ssl4sci.features import extract_features
from ssl4sci.io import write_parquet
from ssl4sci.models import backbone_family, load_backbone, pick_device
from ssl4sci.runtime import setup_process


def embed(data_dir: str | Path, out_path: str | Path, method: str, checkpoint: str | Path | None,
          cfg: dict[str, Any], model_cfg: dict[str, Any], device: str = "auto", threads: int = 1,
          timm: dict[str, Any] | None = None) -> Path:
    """Embed every labelled image (train, val, test) with ``method``'s backbone; ``timm`` = {name, weights} embeds
    with a public timm model."""
    setup_process(threads, cfg["seed"])
    data = PreparedData(data_dir)
    normalise = None
    if timm:
        from ssl4sci.baselines import baseline_normalisation, load_timm_baseline

        backbone, provenance = load_timm_baseline(timm["name"], timm.get("weights"), data.channels, data.image_size)
        provenance["method"] = method
        mean, std = (torch.tensor(v, dtype=torch.float32).view(-1, 1, 1)
                     for v in baseline_normalisation(backbone, data.channels))
        normalise = lambda img: (img - mean) / std  # noqa: E731
    else:
        backbone, provenance = load_backbone(method, checkpoint, model_cfg, data.channels, data.image_size,
                                             seed=cfg["seed"])
    rows = data.rows(LABELLED_SPLITS)
    feats = extract_features(backbone, ImageDataset(data, rows, normalise=normalise), cfg["batch_size"],
                             pick_device(device))
    if not np.isfinite(feats).all():
        raise FloatingPointError(f"{method}: non-finite embeddings; the checkpoint {checkpoint} is probably diverged")
    dim = feats.shape[1]
    table = pa.Table.from_pandas(rows.reset_index(drop=True), preserve_index=False)
    column = pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1).astype(np.float32)), dim)
    table = table.append_column("embedding", column)
    if timm:
        feature = "the model's pooled pre-logits feature"
    elif backbone_family(backbone) in ("swin", "cnn"):
        feature = "average-pooled last stage (pre-logits)"
    else:
        feature = "CLS token of the last block (pre-logits)"
    metadata = {**provenance, "image_size": data.image_size, "embed_dim": dim, "feature": feature}
    write_parquet(out_path, table, metadata=metadata)
    return Path(out_path)
