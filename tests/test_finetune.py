"""The finetune stage (ssl4sci.finetune), classification and regression, on the tiny prepared fixture."""
import json

import pytest
from conftest import FINETUNE_CFG, MODEL_CFG

from ssl4sci.finetune import finetune


@pytest.mark.parametrize("task", ["classify", "regress"])
def test_finetune_tasks(prepared, checkpoint, tmp_path, task):
    res = finetune(prepared, tmp_path, "dino", checkpoint, task, FINETUNE_CFG, MODEL_CFG, device="cpu", threads=2,
                   progress=False, domain="lensing")
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["task"] == task and saved["metrics"] == json.loads(json.dumps(res["metrics"]))
    if task == "classify":
        assert 0 <= res["metrics"]["accuracy"] <= 1 and 0 <= res["metrics"]["macro_auc"] <= 1
        assert set(res["metrics"]["auc_per_class"]) == {"no_sub", "cdm", "axion"}
        assert (tmp_path / "roc.png").exists()
    else:
        assert res["n_test"] == 3 and res["metrics"]["mae"] >= 0 and (tmp_path / "scatter.png").exists()
