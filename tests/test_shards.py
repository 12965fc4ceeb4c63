"""Publishing a prepared shards folder and the samples figure read from it."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ssl4sci.data import shard_file
from ssl4sci.shards import publish_shards, write_samples_png


def test_publish_replaces_an_old_shards_folder(tmp_path):
    out = tmp_path / "data"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "stale.npy").write_bytes(b"old")
    new = tmp_path / ".tmp" / "shards"
    new.mkdir(parents=True)
    np.save(shard_file(new, 0), np.zeros((2, 1, 4, 4), np.float16))
    final = publish_shards(new, out)
    assert final == out / "shards" and sorted(p.name for p in final.iterdir()) == ["shard-00000.npy"]
    assert not new.exists()


def test_samples_png_shows_every_class_from_the_shards(tmp_path):
    np.save(shard_file(tmp_path, 0), np.random.default_rng(0).random((4, 3, 8, 8)).astype(np.float32))
    manifest = pd.DataFrame({"label": ["a", "a", "b", "b"], "shard": [0] * 4, "index": range(4)})
    write_samples_png(tmp_path / "samples.png", manifest, tmp_path, ["a", "b"], 3, 0)
    assert (tmp_path / "samples.png").stat().st_size > 1000
