"""The pretraining curves (ssl4sci.ssl.curves): loss.png from a tiny metrics table."""
import math

import pandas as pd
from PIL import Image

from ssl4sci.ssl.curves import plot_loss

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_plot_loss_writes_a_png_with_and_without_the_monitored_columns(tmp_path):
    history = pd.DataFrame({"epoch": [0, 1, 2], "train_loss": [4.1, 3.6, 3.2], "knn_val": [math.nan, 0.5, 0.6],
                            "effective_rank": [math.nan, 12.0, 10.0], "pc1_share": [math.nan, 0.3, 0.4],
                            "effective_rank_init": [20.0, 20.0, 20.0]})
    plot_loss(history, tmp_path / "loss.png", "dino", min_rank_ratio=0.5)
    plot_loss(history[["epoch", "train_loss"]], tmp_path / "plain.png", "esvit", min_rank_ratio=None)
    for name in ("loss.png", "plain.png"):
        path = tmp_path / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 100
