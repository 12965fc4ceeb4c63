"""Online k-NN monitor: the teacher's weighted k-NN accuracy on the validation split, every few epochs.

A falling loss says the student matches the teacher; it does not say the features separate the classes.
The same DINO-weighted k-NN as the evaluate stage, on un-augmented images, answers that during training.
"""
from __future__ import annotations

import sys
from typing import Any

import numpy as np
import torch

from ssl4sci.data import ImageDataset, PreparedData
from ssl4sci.embed import extract_features
from ssl4sci.evaluate import knn_true_class_rank


def _subset(rows, limit: int, seed: int):
    if len(rows) <= limit:
        return rows
    return rows.sample(n=limit, random_state=seed).sort_index()


class KNNMonitor:
    """Embeds a fixed (seeded) subset of train and val images with a backbone and scores k-NN top-1 on val."""

    def __init__(self, data: PreparedData, cfg: dict[str, Any], batch_size: int, seed: int = 0):
        self.every = int(cfg["every_epochs"])
        self.k, self.temperature = int(cfg["k"]), float(cfg["temperature"])
        self.batch_size = batch_size
        train, val = data.rows(["train"]), data.rows(["val"])
        if self.every and (len(train) == 0 or len(val) == 0):
            # A split without val images is a valid choice (e.g. few-shot pools): train without the monitor.
            print(f"ssl4sci pretrain: {data.dir / 'manifest.parquet'} has {len(train)} train and {len(val)} val images; "
                  "the online k-NN monitor (pretrain.monitor) is off", file=sys.stderr, flush=True)
            self.every = 0
        self.train = ImageDataset(data, _subset(train, int(cfg["max_train"]), seed))
        self.val = ImageDataset(data, _subset(val, int(cfg["max_val"]), seed))

    def due(self, epoch: int, epochs: int) -> bool:
        return self.every > 0 and ((epoch + 1) % self.every == 0 or epoch + 1 == epochs)

    def accuracy(self, backbone: torch.nn.Module, device: torch.device) -> float:
        was_training = backbone.training
        try:  # the embed stage's own feature extraction (eval mode, bf16 on GPU); k-NN normalises the features
            x_fit = extract_features(backbone, self.train, self.batch_size, device)
            x_val = extract_features(backbone, self.val, self.batch_size, device)
        finally:
            backbone.train(was_training)
        k = min(self.k, len(x_fit))
        _, top1 = knn_true_class_rank(x_fit, self.train.label, x_val, self.val.label, k, self.temperature, chunk_size=4096)
        return float(np.mean(top1 == self.val.label))
