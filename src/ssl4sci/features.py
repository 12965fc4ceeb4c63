"""Features of a dataset's images through a frozen backbone: what the embed stage writes and what the pretraining
monitor scores between epochs, computed the same way (eval mode, bf16 autocast on GPU, float32 out)."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from ssl4sci.models import embed_dim


@torch.no_grad()
def extract_features(backbone: torch.nn.Module, dataset, batch_size: int, device: torch.device,
                     num_workers: int = 0) -> np.ndarray:
    """(N, embed_dim) float32 features of every image of ``dataset``, in dataset order; leaves ``backbone`` in eval
    mode on ``device``."""
    backbone = backbone.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    feats = []
    for batch in loader:
        images = batch[0].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = backbone(images)
        feats.append(out.float().cpu().numpy())
    return np.concatenate(feats) if feats else np.zeros((0, embed_dim(backbone)), np.float32)
