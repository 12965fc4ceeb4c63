"""benchmarks/esvit_memory.py: its smoke run prints consistent JSON; its trackers count what a step allocates and
saves, and its CUDA autocast policy runs CUDA's fp32 operations in fp32."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO


@pytest.fixture
def esvit_memory(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import esvit_memory

    return esvit_memory


def test_smoke_prints_consistent_figures():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "esvit_memory.py"), "--smoke"],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert (result["method"], result["precision"], result["measured_batches"]) == ("esvit", "bf16-mixed", [2, 4])
    assert result["autocast"] == "cpu bfloat16, CUDA's fp32 operations in fp32" and result["notes"]
    for step in result["measured_bytes"].values():
        saved = step["saved"]
        assert saved["total"] == saved["backbone"] + saved["heads_and_losses"]
        assert saved["backbone"] > 0 and saved["heads_and_losses"] > 0
        assert step["step_peak"] >= step["retained"] > 0
    small, large = result["measured_bytes"]["2"], result["measured_bytes"]["4"]
    assert large["saved"]["total"] > small["saved"]["total"]  # activations grow with the batch
    state = result["model_state_bytes"]
    assert state["adamw_state"] == 2 * state["gradients"] and state["parameters"] > state["gradients"] > 0
    # the smoke config's batch is 4, the larger one measured: the extrapolation lands on that measurement
    at = result["extrapolated_bytes"]
    assert result["extrapolated_to_batch"] == 4
    assert at["saved.total"] == large["saved"]["total"] and at["retained"] == large["retained"]
    assert at["step_peak"] == large["step_peak"]
    assert at["estimated_peak"] == at["step_peak"] + state["parameters"] + state["adamw_state"]


def test_tensor_bytes_follows_allocations_and_frees(esvit_memory):
    x = torch.nn.Parameter(torch.randn(1000))
    with esvit_memory.TensorBytes() as tensors:
        y = (x * 2).exp().sum()  # x * 2 is freed at once; exp keeps its output for backward; y is 4 bytes
        assert tensors.live == 4000 + 4
        y.backward()  # exp's output freed, x's gradient made
        assert tensors.live == 4000 + 4
    # at the peak: x * 2 and exp's output (forward); in backward exp's output, the gradient, y and the seed
    assert tensors.timeline[:2] == [4000, 8000] and max(tensors.timeline) == 4000 + 4000 + 4 + 4
    assert torch.equal(x.grad, 2 * (2 * x.detach()).exp())


def test_saved_bytes_splits_backbone_and_the_rest(esvit_memory):
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Linear(3, 5))
    model = torch.nn.ModuleDict({"backbone": backbone, "head": torch.nn.Linear(5, 2)})
    x = torch.randn(4, 3)
    saved = esvit_memory.SavedBytes(model, backbone)
    with saved.hooks():
        loss = model["head"](backbone(x)).exp().sum()
    saved.remove()
    # backbone: its input x (4 x 3); the rest: the head's input (4 x 5) and exp's output (4 x 2); weights left out
    assert saved.totals() == {"total": (12 + 20 + 8) * 4, "backbone": 12 * 4, "heads_and_losses": (20 + 8) * 4}
    loss.backward()


def test_cuda_policy_runs_layer_norm_and_softmax_in_fp32_and_matmuls_low(esvit_memory):
    norm, linear = torch.nn.LayerNorm(8), torch.nn.Linear(8, 4)
    x = torch.randn(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = norm(linear(x).repeat(1, 2))
        with esvit_memory.CudaFp32Ops():
            h = linear(x)
            out = norm(h.repeat(1, 2)), torch.softmax(h, dim=-1), torch.nn.functional.log_softmax(h, dim=-1)
    assert low.dtype == torch.bfloat16  # CPU autocast alone keeps layer_norm in bf16
    assert h.dtype == torch.bfloat16 and all(t.dtype == torch.float32 for t in out)
