#!/usr/bin/env python
"""Print the memory one EsViT (or DINO) training step holds, measured on a CPU and extrapolated, as JSON.

    python benchmarks/esvit_memory.py [--config config/lensing_model1.yaml] [--method esvit] [--batch 16]
                                      [--precision bf16-mixed] [--autocast-policy cuda] [--channels 1]
    python benchmarks/esvit_memory.py --smoke     # seconds: a tiny model and config

A GPU-free proxy for the step's memory. The project's module (``pretrain.method_class``, built as ``pretrain()``
builds it) runs ``compute_loss``, the centre updates and ``backward`` once on random views of the config's crop
sizes, at ``--batch // 2`` and ``--batch`` images, in train mode, under CPU autocast at the config's precision with
the operations CUDA autocast runs in fp32 run in fp32 (``--autocast-policy cuda``). It records
- ``saved``: bytes autograd keeps for backward (``torch.autograd.graph.saved_tensors_hooks``, each storage once,
  parameters excluded), split into the student backbone's and the rest's (``heads_and_losses``: heads, losses);
- ``retained``: bytes of every tensor the step created that is still alive when the forward pass ends: the saved
  tensors plus what activation checkpointing holds for its recomputation (its inputs, the teacher's targets);
- ``step_peak``: the most bytes of tensors created by the step alive at once, forward or backward (the
  activations, the teacher's outputs, temporaries, the gradients).
Each is extrapolated linearly in the batch (intercept + slope x batch, through the two sizes) to the config's batch
size, the peak operator by operator (the live bytes after each operator, then their maximum: the peak's place
moves with the batch). The region loss cuts each view into pieces by size; the measured steps cut it into as many
as the target batch would, so the pieces extrapolate to the target's. ``estimated_peak`` adds the parameters
(student and teacher) and AdamW's two fp32 moments. The JSON's ``notes`` say what the proxy does not count.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import sys
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from ssl_throughput import SMOKE, synthetic_batch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map_only

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from ssl4sci.config import load_config, model_for, validate_config  # noqa: E402
from ssl4sci.pretrain import method_class  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
# The throughput smoke config, with EsViT on its one-block ViT: seconds on a CPU.
SMOKE_CONFIG = {**SMOKE, "pretrain": {**SMOKE["pretrain"], "esvit": {"model": {}}}}
AUTOCAST = {"32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
NOTES = [
    "Measured on a CPU and extrapolated linearly in the batch: an estimate of the GPU step, not a GPU measurement.",
    "Mixed precision: CPU autocast, whose low-precision operations (matmuls, linear layers, convolutions, "
    "attention) are CUDA autocast's; with the cuda policy, the operations CUDA autocast runs in fp32 and CPU "
    "autocast does not (layer_norm, group_norm, softmax, log_softmax, normalize, norm, exp, log, pow, cumsum, "
    "prod) run in fp32 as on a GPU, matched where the code calls them (torch.overrides.TorchFunctionMode).",
    "Counted: tensors the step creates (activations, autocast's cast copies, the teacher's outputs, temporaries "
    "between operators, gradients), the parameters and AdamW's two moments.",
    "Not counted: the allocator's caching and fragmentation, cuDNN / cuBLAS / attention-kernel workspaces, "
    "scratch memory inside one operator, the CUDA context, the optimiser step's temporaries, and the views' "
    "host-to-device batch.",
]


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


class CudaFp32Ops(TorchFunctionMode):
    """Under CPU autocast, the operations CUDA autocast runs in fp32 (and CPU autocast in the low dtype) run in fp32,
    their low-precision inputs cast up first, as on a GPU: the normalisations, softmaxes, norms, exp, log, pow."""

    OPS = {F.layer_norm, F.group_norm, F.softmax, F.log_softmax, F.normalize, torch.softmax, torch.log_softmax,
           torch.Tensor.softmax, torch.Tensor.log_softmax, torch.norm, torch.Tensor.norm, torch.exp, torch.Tensor.exp,
           torch.log, torch.Tensor.log, torch.pow, torch.Tensor.pow, torch.cumsum, torch.Tensor.cumsum, torch.prod,
           torch.Tensor.prod}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.OPS and torch.is_autocast_enabled("cpu"):
            args, kwargs = tree_map_only(torch.Tensor, _fp32, (args, kwargs))
            with torch.autocast("cpu", enabled=False):
                return func(*args, **kwargs)
        return func(*args, **kwargs)


class TensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages allocated by the operators run under it that are still alive, and their peak.

    An output that shares a storage with an input (a view, an in-place result) allocates nothing; a storage's
    bytes are released when it is freed (a weakref callback on the storage object, which lives as long as it).
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.timeline: list[int] = []  # live bytes after each operator, its outputs allocated
        self._tracked: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self._track(t.untyped_storage())
        self.timeline.append(self.live)
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        if id(storage) in self._tracked or storage.nbytes() == 0:
            return
        self._tracked.add(id(storage))
        self.live += storage.nbytes()
        weakref.finalize(storage, self._release, id(storage), storage.nbytes())

    def _release(self, key: int, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live -= nbytes


class SavedBytes:
    """Bytes autograd saves for backward under ``hooks()``, each storage once, the module's parameters and buffers
    excluded; attributed to ``backbone`` while one of its child modules runs (``backbone_tokens`` calls
    ``forward_features`` directly, so the backbone's own hooks never fire), else to ``heads_and_losses``."""

    def __init__(self, module: torch.nn.Module, backbone: torch.nn.Module):
        self._skip = {t.untyped_storage().data_ptr() for t in itertools.chain(module.parameters(), module.buffers())}
        self._saved: dict[int, tuple[str, int]] = {}
        self._depth = 0
        self._handles = []
        for child in backbone.children():
            self._handles.append(child.register_forward_pre_hook(self._enter))
            self._handles.append(child.register_forward_hook(self._leave))

    def _enter(self, *_):
        self._depth += 1

    def _leave(self, *_):
        self._depth -= 1

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self._skip and storage.data_ptr() not in self._saved:
            self._saved[storage.data_ptr()] = ("backbone" if self._depth else "heads_and_losses", storage.nbytes())
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def totals(self) -> dict[str, int]:
        parts = {"backbone": 0, "heads_and_losses": 0}
        for scope, nbytes in self._saved.values():
            parts[scope] += nbytes
        return {"total": sum(parts.values()), **parts}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def step_memory(module, views: list[torch.Tensor], teacher_temp: float, dtype: torch.dtype | None,
                cuda_policy: bool = True) -> dict:
    """One training step's forward (``compute_loss``, centre updates) and backward, as ``training_step`` and
    Lightning's closure run it: gradients set to None before, autocast around the forward only (activation
    checkpointing restores it for its recomputations in backward), with CUDA's fp32 operations unless
    ``cuda_policy`` is off. Returns the saved bytes, the live bytes when the forward ends (``retained``) and the
    live bytes after every operator."""
    module.zero_grad(set_to_none=True)
    saved = SavedBytes(module, module.student.backbone)
    with CudaFp32Ops() if cuda_policy else contextlib.nullcontext(), TensorBytes() as tensors:
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None), saved.hooks():
            step = module.compute_loss(views, teacher_temp)
            module.update_centers(step)
            loss = step.loss
            del step  # training_step keeps only the loss for backward
        retained, forward_ops = tensors.live, len(tensors.timeline)
        # The engine called directly: loss.backward() would pass through CudaFp32Ops's handler, which switches the
        # mode off for what it calls, and activation checkpointing's recomputation would then differ from forward.
        torch.autograd.Variable._execution_engine.run_backward(
            (loss,), (torch.ones_like(loss),), False, False, (), allow_unreachable=True, accumulate_grad=True)
    saved.remove()
    module.zero_grad(set_to_none=True)
    return {"saved": saved.totals(), "retained": retained, "timeline": tensors.timeline, "forward_ops": forward_ops}


def model_state(module) -> dict[str, int]:
    """Parameters and buffers of both networks; the student's trainable gradients and AdamW's two moments (fp32,
    like the parameters under mixed precision)."""
    trainable = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    tensors = itertools.chain(module.parameters(), module.buffers())
    return {"parameters": sum(t.numel() * t.element_size() for t in tensors), "gradients": trainable,
            "adamw_state": 2 * trainable}


def line_through(small: float, large: float, b_small: int, b_large: int, target: int) -> float:
    """intercept + slope x batch through (b_small, small) and (b_large, large), at ``target``."""
    return large + (large - small) / (b_large - b_small) * (target - b_large)


def peak_at(small: dict, large: dict, b_small: int, b_large: int, target: int) -> tuple[float, str]:
    """The step's peak live bytes at ``target`` images and whether it falls in the forward or the backward pass.

    Extrapolated operator by operator (the step runs the same operators in the same order at any batch size), then
    the maximum taken: the peak's place moves with the batch (at a few images the batch-independent gradients and
    weight copies set it; at hundreds, the activations)."""
    if len(small["timeline"]) != len(large["timeline"]) or small["forward_ops"] != large["forward_ops"]:
        raise RuntimeError(f"the step ran {len(small['timeline'])} operators at batch {b_small} but "
                           f"{len(large['timeline'])} at batch {b_large}: no operator-wise extrapolation (a larger "
                           f"--batch lets every view's region-loss pieces fit in the smaller batch)")
    live = [line_through(a, b, b_small, b_large, target) for a, b in zip(small["timeline"], large["timeline"])]
    at = max(range(len(live)), key=live.__getitem__)
    return live[at], "forward" if at < large["forward_ops"] else "backward"


def autocast_name(dtype: torch.dtype | None, cuda_policy: bool) -> str:
    if dtype is None:
        return "off"
    name = f"cpu {str(dtype).removeprefix('torch.')}"
    return f"{name}, CUDA's fp32 operations in fp32" if cuda_policy else name


def summary(step: dict) -> dict:
    return {"saved": step["saved"], "retained": step["retained"], "step_peak": max(step["timeline"])}


def measure(config: dict, method: str, batch: int, precision: str, channels: int, cuda_policy: bool = True) -> dict:
    cfg = copy.deepcopy(config["pretrain"])
    cfg["guard"]["enabled"] = False
    target = cfg["batch_size"]
    cfg["batch_size"] = batch
    torch.manual_seed(cfg["seed"])
    module = method_class(method)(cfg, model_for(config, method), channels, config["prepare"]["image_size"],
                                  steps_per_epoch=1, world_batch=batch, monitor=None, data_counts=None)
    module.train()
    teacher_temp = float(cfg["warmup_teacher_temp"])
    sizes = (batch // 2, batch)
    measured = {}
    region_loss = getattr(module, "region_loss", None)
    piece_elements = getattr(region_loss, "piece_elements", None)
    for size in sizes:
        if piece_elements is not None:
            # RegionLoss cuts each view into pieces by size: scaled with the batch, the step cuts every view into as
            # many pieces as at the target batch, so the extrapolation sees the target's piece sizes
            region_loss.piece_elements = piece_elements * size / target
        views = synthetic_batch({**cfg, "batch_size": size}, channels, torch.device("cpu"))[0]["views"]
        measured[size] = step_memory(module, views, teacher_temp, AUTOCAST[precision], cuda_policy)
    small, large = measured[sizes[0]], measured[sizes[1]]
    state = model_state(module)
    at_target = {f"saved.{key}": line_through(small["saved"][key], large["saved"][key], *sizes, target)
                 for key in large["saved"]}
    at_target["retained"] = line_through(small["retained"], large["retained"], *sizes, target)
    at_target["step_peak"], peak_in = peak_at(small, large, *sizes, target)
    at_target["model_state"] = state["parameters"] + state["gradients"] + state["adamw_state"]
    # step_peak counts the gradients (made by backward) already: add what exists before the step
    at_target["estimated_peak"] = at_target["step_peak"] + state["parameters"] + state["adamw_state"]
    return {"method": method, "model": model_for(config, method)["name"], "precision": precision,
            "autocast": autocast_name(AUTOCAST[precision], cuda_policy),
            "views": 2 + cfg["local_crops_number"], "out_dim": cfg["out_dim"],
            "measured_batches": list(sizes), "measured_bytes": {str(s): summary(measured[s]) for s in sizes},
            "model_state_bytes": state, "extrapolated_to_batch": target, "step_peak_in": peak_in,
            "extrapolated_bytes": at_target, "extrapolated_gib": {k: round(v / GIB, 3) for k, v in at_target.items()},
            "notes": NOTES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "config" / "lensing_model1.yaml"))
    parser.add_argument("--method", default="esvit")
    parser.add_argument("--batch", type=int, default=None,
                        help="measured at this batch and half of it (default 16, 4 with --smoke; the smaller one "
                             "needs as many images as the region loss cuts a view into at the target batch: 7 at "
                             "the full size)")
    parser.add_argument("--precision", default=None, choices=sorted(AUTOCAST),
                        help="default: the config's pretrain.precision")
    parser.add_argument("--channels", type=int, default=1, help="image channels (the lensing data: 1)")
    parser.add_argument("--autocast-policy", default="cuda", choices=["cuda", "cpu"],
                        help="cuda: CPU autocast with the operations CUDA runs in fp32 run in fp32 (default); "
                             "cpu: CPU autocast as it is")
    parser.add_argument("--smoke", action="store_true", help="a tiny model and config, seconds on a CPU")
    args = parser.parse_args(argv)
    args.batch = args.batch or (4 if args.smoke else 16)
    if args.batch < 2:
        parser.error(f"--batch {args.batch}: needs at least 2 (the fit takes two batch sizes)")
    config = validate_config(copy.deepcopy(SMOKE_CONFIG)) if args.smoke else load_config(args.config)
    precision = args.precision or config["pretrain"]["precision"]
    result = measure(config, args.method, args.batch, precision, args.channels, args.autocast_policy == "cuda")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
