"""Backbones: timm's create_model is the single door; checkpoints map back to backbones.

Three families are supported, each returning its pooled feature from ``backbone(x)`` (``num_classes=0``):

* ViT (timm ``VisionTransformer``): the CLS token (or whatever pooling the timm model is configured with);
  ``dynamic_img_size`` so crops of any multiple of the patch size work.
* Swin (timm ``SwinTransformer`` / ``SwinTransformerV2``): the average of the last stage's tokens; built with
  ``strict_img_size=False``, so windows are padded and shift masks are rebuilt for every input size.
* CNN (any other timm model whose ``forward_features`` returns a (B, C, H, W) map: ResNet, ConvNeXt, RegNet,
  EfficientNet, ...): timm's global average pool of the last stage. A CNN takes any input size, so ``patch_size`` and
  ``depth`` (ViT keys) are ignored for it; the Swin-only keys are an error.

``backbone_tokens`` gives both the pooled feature and the final patch tokens in one forward pass (EsViT's
region-level loss needs the tokens; for a CNN they are the positions of the last feature map).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer_v2 import SwinTransformerV2
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ssl4sci.io import file_sha256
from ssl4sci.registry.baselines import is_untrained

# timm modules whose models are built with the Swin keyword set (checked against the built class afterwards).
SWIN_MODULES = ("swin_transformer", "swin_transformer_v2")
SWIN_CLASSES = (SwinTransformer, SwinTransformerV2)
SWIN_ONLY_KEYS = ("window_size", "embed_dim", "depths", "num_heads")
VIT_MODULES = ("vision_transformer", "deit")
SUPPORTED = ("a timm ViT (VisionTransformer: vit_*, deit_*), Swin (SwinTransformer/V2: swin_*, swinv2_* but not "
             "swinv2_cr_*) or CNN (a model whose forward_features returns a (B, C, H, W) map: resnet*, convnext*, ...)")


def backbone_family(backbone: nn.Module) -> str:
    """'vit', 'swin' or 'cnn', from the model's class (a CNN is marked when it is built, see create_backbone)."""
    if isinstance(backbone, VisionTransformer):
        return "vit"
    if isinstance(backbone, SWIN_CLASSES):
        return "swin"
    if getattr(backbone, "ssl4sci_family", None) == "cnn":
        return "cnn"
    raise ValueError(f"{type(backbone).__name__} is not {SUPPORTED}")


def family_of_name(name: str) -> str:
    """'vit', 'swin' or 'cnn' for a timm model name, from the timm module that registers it (no model is built)."""
    if timm.models.is_model_in_modules(name, SWIN_MODULES):
        return "swin"
    if timm.models.is_model_in_modules(name, VIT_MODULES):
        return "vit"
    return "cnn"


def _swin_kwargs(model_cfg: dict[str, Any]) -> dict[str, Any]:
    name = model_cfg["name"]
    kwargs: dict[str, Any] = {"strict_img_size": False}
    for key in ("window_size", "embed_dim"):
        if model_cfg.get(key) is not None:
            kwargs[key] = model_cfg[key]
    depths = model_cfg.get("depths")
    if depths is not None:
        kwargs["depths"] = tuple(int(d) for d in depths)
    heads = model_cfg.get("num_heads")
    if heads is not None:
        if isinstance(heads, int):  # one head count for every stage
            if depths is None:  # the number of stages is the timm model's own: read it from a weightless copy
                n_stages = len(timm.create_model(name, pretrained=False, num_classes=0, device="meta").layers)
            else:
                n_stages = len(depths)
            heads = (heads,) * n_stages
        elif depths is not None and len(heads) != len(depths):
            raise ValueError(f"config key 'model.num_heads': expected one head count per stage of model.depths "
                             f"({len(depths)} stages), got {list(heads)}")
        kwargs["num_heads"] = tuple(int(h) for h in heads)
    return kwargs


def _vit_kwargs(model_cfg: dict[str, Any]) -> dict[str, Any]:
    for key in SWIN_ONLY_KEYS:
        if model_cfg.get(key) is not None:
            raise ValueError(f"config key 'model.{key}': only for Swin models, but model.name is the ViT "
                             f"'{model_cfg['name']}' (a ViT's size comes from its name and model.depth)")
    kwargs: dict[str, Any] = {"dynamic_img_size": True}
    if model_cfg.get("depth"):
        kwargs["depth"] = model_cfg["depth"]
    return kwargs


def _cnn_kwargs(model_cfg: dict[str, Any]) -> dict[str, Any]:
    for key in SWIN_ONLY_KEYS:
        if model_cfg.get(key) is not None:
            raise ValueError(f"config key 'model.{key}': only for Swin models, but model.name is the CNN "
                             f"'{model_cfg['name']}' (a CNN's size comes from its name)")
    return {}


def create_backbone(model_cfg: dict[str, Any], in_chans: int, img_size: int,
                    drop_path_rate: float | None = None) -> nn.Module:
    """A timm ViT, Swin or CNN returning its pooled feature from ``backbone(x)``, accepting crops of other sizes.

    ``model_cfg`` keys: ``name``, ``patch_size``, ``drop_path_rate``; ``depth`` (ViT only, ignored for Swin and CNNs,
    so a Swin config laid over a ViT one may keep it); ``window_size``, ``embed_dim`` (first stage), ``depths`` (blocks
    per stage), ``num_heads`` (per stage, or one int for all): Swin only, an error on a ViT or CNN when set. A missing
    or None key keeps the timm model's own value. ``patch_size`` is ignored for CNNs. ``grad_checkpointing``: the
    blocks recompute their activations in backward (timm's ``set_grad_checkpointing``).
    """
    name = model_cfg["name"]
    family = family_of_name(name)
    rate = model_cfg["drop_path_rate"] if drop_path_rate is None else drop_path_rate
    kwargs: dict[str, Any] = dict(pretrained=False, num_classes=0, in_chans=in_chans)
    if family == "cnn":
        kwargs.update(_cnn_kwargs(model_cfg))
        if rate:  # not every CNN takes stochastic depth; ask only when it is wanted
            kwargs["drop_path_rate"] = rate
    else:
        kwargs.update(img_size=img_size, patch_size=model_cfg["patch_size"], drop_path_rate=rate)
        kwargs.update(_swin_kwargs(model_cfg) if family == "swin" else _vit_kwargs(model_cfg))
    label = {"vit": "ViT", "swin": "Swin", "cnn": "CNN"}[family]
    try:
        backbone = timm.create_model(name, **kwargs)
    except (RuntimeError, TypeError, ValueError, IndexError, AssertionError) as exc:
        raise ValueError(f"config key 'model.name': timm could not build '{name}' as a {label} "
                         f"(expected {SUPPORTED}): {type(exc).__name__}: {exc}") from exc
    if family == "cnn":
        _check_cnn(backbone, name, in_chans, img_size)
        backbone.ssl4sci_family = "cnn"
    else:
        expected = SWIN_CLASSES if family == "swin" else (VisionTransformer,)
        if not isinstance(backbone, expected):
            raise ValueError(f"config key 'model.name': '{name}' builds a timm {type(backbone).__name__}, "
                             f"expected {SUPPORTED}")
    if model_cfg.get("grad_checkpointing"):  # absent in checkpoints written before the key existed
        try:
            backbone.set_grad_checkpointing(True)
        except (AssertionError, NotImplementedError, AttributeError) as exc:
            raise ValueError(f"config key 'model.grad_checkpointing': timm's '{name}' cannot recompute its blocks "
                             f"in backward ({type(exc).__name__}: {exc}); set it to false") from exc
    return backbone


def _check_cnn(backbone: nn.Module, name: str, in_chans: int, img_size: int) -> None:
    """A model outside the ViT and Swin modules is used as a CNN only if its features are a (B, C, H, W) map."""
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            feats = backbone.forward_features(torch.zeros(1, in_chans, img_size, img_size))
    except Exception as exc:  # any failure here means the model cannot serve as a backbone at this size
        raise ValueError(f"config key 'model.name': '{name}' failed on a {in_chans}x{img_size}x{img_size} input "
                         f"({type(exc).__name__}: {exc}); expected {SUPPORTED}") from exc
    finally:
        backbone.train(was_training)
    if feats.ndim != 4:
        raise ValueError(f"config key 'model.name': '{name}' ({type(backbone).__name__}) gives features of shape "
                         f"{tuple(feats.shape)}, expected {SUPPORTED}")


def backbone_tokens(backbone: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass: (pooled (B, D), identical to ``backbone(x)``; final patch tokens (B, N, D)).

    ViT: the tokens after the final norm without the CLS/register prefix tokens, N = (H/p)(W/p).
    Swin: the last stage's NHWC map after the final norm, flattened row-major to (B, H'W', C).
    CNN: the last stage's (B, C, H', W') map, flattened row-major to (B, H'W', C).
    Calls ``forward_features``/``forward_head`` directly, so forward hooks on ``backbone`` itself do not fire.
    """
    family = backbone_family(backbone)
    feats = backbone.forward_features(x)
    pooled = backbone.forward_head(feats)
    if family == "vit":
        tokens = feats[:, backbone.num_prefix_tokens:]
    elif family == "cnn":
        tokens = feats.flatten(2).transpose(1, 2)
    else:
        tokens = feats.flatten(1, 2)
    return pooled, tokens


def embed_dim(backbone: nn.Module) -> int:
    """Width of the pooled feature: timm's ``num_features`` (every family has it; ``embed_dim`` as a fallback)."""
    return int(backbone.num_features if hasattr(backbone, "num_features") else backbone.embed_dim)


def load_backbone(method: str, checkpoint: str | Path | None, model_cfg: dict[str, Any], in_chans: int,
                  img_size: int, seed: int = 0):
    """The backbone named by ``method``: a trained teacher from a checkpoint, or a baseline.

    Returns (backbone in eval mode, provenance dict for metadata).
    """
    if is_untrained(method):  # random_init_<method>: that method's architecture, in model_cfg
        torch.manual_seed(seed)
        backbone = create_backbone(model_cfg, in_chans, img_size, drop_path_rate=0.0)
        return backbone.eval(), {"method": method, "model": model_cfg["name"],
                                 "checkpoint_sha256": f"none (random init, seed {seed})"}
    if checkpoint is None:
        raise ValueError(f"method '{method}' needs a checkpoint")
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if "teacher_backbone" not in ckpt:
        raise ValueError(f"{checkpoint}: expected an ssl4sci pretrain checkpoint with 'teacher_backbone' weights")
    hp = ckpt["ssl4sci"]
    backbone = create_backbone(hp["model"], hp["in_chans"], hp["img_size"], drop_path_rate=0.0)
    backbone.load_state_dict(ckpt["teacher_backbone"])
    return backbone.eval(), {"method": method, "model": hp["model"]["name"],
                             "checkpoint_sha256": file_sha256(checkpoint)}


def pick_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("config key 'device': 'cuda' requested but no GPU is visible")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
