"""The self-supervised pretraining methods."""
from __future__ import annotations

METHODS: dict[str, str] = {"dino": "ssl4sci.ssl.dino:DINO", "esvit": "ssl4sci.ssl.esvit:EsViT"}
"""Self-supervised methods: a LightningModule class built as ``cls(cfg, model_cfg, channels, image_size, ...)``."""
