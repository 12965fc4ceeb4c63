"""The pretraining monitor (ssl4sci.ssl.monitor): online k-NN and effective rank, as the evaluate stage scores them."""
import math

import pytest
import torch
from conftest import MODEL_CFG, PRETRAIN_CFG, default_section

from ssl4sci.ssl.monitor import KNNMonitor


def test_monitor_scores_the_same_knn_as_the_evaluate_stage(prepared, tmp_path):
    from ssl4sci.data import PreparedData
    from ssl4sci.embed import embed
    from ssl4sci.evaluate import evaluate
    from ssl4sci.models import create_backbone

    data = PreparedData(prepared)
    monitor = KNNMonitor(data, dict(PRETRAIN_CFG["monitor"], k=5), batch_size=7)
    assert [e for e in range(5) if monitor.due(e, 5)] == [1, 3, 4]
    no_val = PreparedData(prepared)
    no_val.manifest = no_val.manifest.assign(split=no_val.manifest["split"].replace("val", "train"))
    rank_only = KNNMonitor(no_val, PRETRAIN_CFG["monitor"], batch_size=7)  # no val split: k-NN off, no crash
    assert [e for e in range(5) if rank_only.due(e, 5)] == [1, 3, 4] and not rank_only.knn
    torch.manual_seed(0)
    backbone = create_backbone(MODEL_CFG, data.channels, data.image_size, drop_path_rate=0.0)
    without_val = rank_only.measure(backbone, torch.device("cpu"))
    assert math.isnan(without_val["knn_val"]) and without_val["effective_rank"] > 1
    online = monitor.measure(backbone, torch.device("cpu"))
    assert backbone.training  # the monitor restores the mode it found
    path = embed(prepared, tmp_path / "r.parquet", "random_init", None, {"batch_size": 8, "seed": 0}, MODEL_CFG,
                 device="cpu")
    knn_cfg = default_section("evaluate", knn_k=5, knn_temperature=PRETRAIN_CFG["monitor"]["temperature"],
                              fit_splits=["train"], score_split="val")
    offline = evaluate(path, "knn", knn_cfg, tmp_path / "knn.json")
    assert online["knn_val"] == pytest.approx(offline["metrics"]["top1"])
    # the monitor's subset is the whole (small) train split: the same spectrum as the evaluate stage's protocol
    spectrum_cfg = default_section("evaluate", fit_splits=["train"])
    spectrum = evaluate(path, "spectrum", spectrum_cfg, tmp_path / "spectrum.json")["metrics"]
    assert online["effective_rank"] == pytest.approx(spectrum["effective_rank"], rel=1e-4)
    assert online["pc1_share"] == pytest.approx(spectrum["pc1_share"], rel=1e-4)
