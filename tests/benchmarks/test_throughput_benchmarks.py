"""The throughput benchmarks run end to end in their CPU smoke mode and print consistent JSON."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from conftest import REPO


def smoke(script: str) -> dict:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--smoke", "--device", "cpu"],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout[proc.stdout.index("{"):])


@pytest.mark.parametrize("script", ["ssl_throughput.py", "embed_throughput.py"])
def test_smoke_prints_the_three_rates_and_their_ratio(script):
    result = smoke(script)
    rates = result["img_per_s"]
    assert set(rates) == {"ceiling", "pipeline", "data"}
    assert all(math.isfinite(v) and v > 0 for v in rates.values())
    assert result["pipeline_over_ceiling"] == pytest.approx(rates["pipeline"] / rates["ceiling"])
    assert result["device"] == "cpu" and result["peak_memory_mb"] > 0 and result["compiled"] is False
    if script == "ssl_throughput.py":
        # the smoke config: batch 4, 2 global + 2 local views; FLOPs of a real forward and backward
        assert (result["batch_size"], result["views"], result["steps_timed"]) == (4, 4, 3)
        assert result["step_gflop"] > 0
        assert result["achieved_tflop_per_s"] == pytest.approx(
            result["step_gflop"] * rates["ceiling"] / result["batch_size"] / 1e3)
    else:
        assert result["images"] == 12 and result["batch_size"] == 12  # 4 per class x 3 classes, no pool
        # the stage's streaming export with the schema's loader defaults, batches crossing in the stored dtype
        assert result["num_workers"] == 0 and result["stored_dtype"] == "float16"
