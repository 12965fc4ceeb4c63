"""Online monitor: the teacher's weighted k-NN accuracy on the validation split and the effective rank of its
features on a fixed train subset, every few epochs.

A falling loss says the student matches the teacher; it does not say the features separate the classes.
The same DINO-weighted k-NN as the evaluate stage (``ssl4sci.knn``), on un-augmented images, answers that during
training.
A healthy-looking head does not say the backbone's features span more than a few directions either
(dimensional collapse): their effective rank (``ssl4sci.spectrum``) does, and needs no labels.
"""
from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np
import torch

from ssl4sci.data import ImageDataset, PreparedData, seeded_subset
from ssl4sci.features import extract_features
from ssl4sci.knn import knn_true_class_rank
from ssl4sci.spectrum import spectrum_summary


class KNNMonitor:
    """Embeds a fixed (seeded) subset of train and val images with a backbone; scores k-NN top-1 on val and the
    spectrum (effective rank, PC1 variance share) of the train features."""

    def __init__(self, data: PreparedData, cfg: dict[str, Any], batch_size: int, seed: int = 0):
        self.every = int(cfg["every_epochs"])
        self.k, self.temperature = int(cfg["k"]), float(cfg["temperature"])
        self.batch_size = batch_size
        train, val = data.rows(["train"]), data.rows(["val"])
        self.knn = len(train) > 0 and len(val) > 0
        if self.every and len(train) == 0:
            print(f"ssl4sci pretrain: {data.dir / 'manifest.parquet'} has no train images; the online monitor "
                  "(pretrain.monitor) is off", file=sys.stderr, flush=True)
            self.every = 0
        elif self.every and not self.knn:
            # A split without val images is a valid choice (e.g. few-shot pools): the rank needs no val images.
            print(f"ssl4sci pretrain: {data.dir / 'manifest.parquet'} has {len(train)} train and {len(val)} val "
                  "images; the online k-NN (pretrain.monitor) is off, the effective rank is still measured",
                  file=sys.stderr, flush=True)
        self.train = ImageDataset(data, seeded_subset(train, int(cfg["max_train"]), seed))
        self.val = ImageDataset(data, seeded_subset(val, int(cfg["max_val"]), seed))

    def due(self, epoch: int, epochs: int) -> bool:
        return self.every > 0 and ((epoch + 1) % self.every == 0 or epoch + 1 == epochs)

    def measure(self, backbone: torch.nn.Module, device: torch.device, knn: bool = True) -> dict[str, float]:
        """``knn_val`` (NaN without val images, or when ``knn`` is False), ``effective_rank`` and ``pc1_share``."""
        was_training = backbone.training
        try:  # the embed stage's feature extraction (eval mode, bf16 on GPU); k-NN normalises the features
            x_fit = extract_features(backbone, self.train, self.batch_size, device)
            x_val = extract_features(backbone, self.val, self.batch_size, device) if knn and self.knn else None
        finally:
            backbone.train(was_training)
        out = {"knn_val": math.nan, "effective_rank": math.nan, "pc1_share": math.nan}
        if np.isfinite(x_fit).all():  # a non-finite feature is the loss guard's business; the monitor just records NaN
            spectrum = spectrum_summary(x_fit)
            out["effective_rank"] = spectrum["effective_rank"]
            out["pc1_share"] = math.nan if spectrum["pc1_share"] is None else spectrum["pc1_share"]
        if x_val is not None:
            k = min(self.k, len(x_fit))
            _, top1 = knn_true_class_rank(x_fit, self.train.label, x_val, self.val.label, k, self.temperature,
                                          chunk_size=4096)
            out["knn_val"] = float(np.mean(top1 == self.val.label))
        return out
