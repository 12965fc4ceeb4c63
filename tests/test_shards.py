"""Publishing a prepared shards folder and the samples figure read from it."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ssl4sci.data import shard_file
from ssl4sci.shards import layout_stats, publish_shards, split_counts, write_samples_png


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


def test_split_counts_and_layout_stats_describe_what_the_shards_hold():
    manifest = pd.DataFrame({"split": ["train", "train", "val", "test", "unlabelled"],
                             "label": ["a", "b", "a", "b", ""]})
    counts = split_counts(manifest, ["a", "b", "c"])
    assert counts == {"train": {"a": 1, "b": 1, "c": 0}, "val": {"a": 1, "b": 0, "c": 0},
                      "test": {"a": 0, "b": 1, "c": 0}}
    assert all(type(v) is int for split in counts.values() for v in split.values())  # JSON-ready
    stats = layout_stats(manifest, np.array([False, False, False, False, True]), ["a", "b", "c"], counts,
                         dtype="uint8", shard_size=4, n_shards=2, has_masks=False, n_rejected=3)
    assert list(stats) == ["dtype", "shard_size", "n_shards", "has_masks", "classes", "n_images", "n_unlabelled",
                           "n_rejected", "counts"]
    assert (stats["n_images"], stats["n_unlabelled"], stats["n_rejected"]) == (5, 1, 3)
