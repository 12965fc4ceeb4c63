"""The shards folder of prepared data, as both prepare stages write it: moving a finished temporary folder into place,
and ``samples.png``, a grid of sample images per class read back from the shards."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from ssl4sci.data import shard_file
from ssl4sci.io import save_figure


def split_counts(manifest: pd.DataFrame, classes: list[str]) -> dict[str, dict[str, int]]:
    """Images of each class in each labelled split (0 where a class has none), as stats.json records them."""
    return {s: {c: int(v) for c, v in manifest.loc[manifest["split"] == s, "label"].value_counts()
                .reindex(classes, fill_value=0).items()}
            for s in ("train", "val", "test")}


def layout_stats(manifest: pd.DataFrame, pool: np.ndarray, classes: list[str], counts: dict, *, dtype: str,
                 shard_size: int, n_shards: int, has_masks: bool, n_rejected: int) -> dict:
    """The part of stats.json every prepare stage writes alike: how the shards are stored and what they hold."""
    return {
        "dtype": dtype,
        "shard_size": shard_size,
        "n_shards": n_shards,
        "has_masks": has_masks,
        "classes": classes,
        "n_images": int(len(manifest)),
        "n_unlabelled": int(pool.sum()),
        "n_rejected": int(n_rejected),
        "counts": counts,
    }


def publish_shards(shard_dir: Path, out_dir: Path) -> Path:
    """Move a finished temporary shards folder to ``out_dir/shards`` (replacing an old one) and return it."""
    final = out_dir / "shards"
    if final.exists():
        shutil.rmtree(final)
    shard_dir.rename(final)
    return final


def _shown(img: np.ndarray) -> np.ndarray:
    """What imshow gets: the first channel (colour-mapped), or a 3-channel image as RGB scaled by its maximum."""
    return img[0] if img.shape[0] != 3 else np.clip(np.moveaxis(img, 0, -1) / max(img.max(), 1e-12), 0, 1)


def write_samples_png(path: Path, manifest: pd.DataFrame, shard_dir: Path, classes: list[str], per_class: int,
                      seed: int) -> None:
    """One row per class of up to ``per_class`` seeded random images (in manifest order) from ``shard_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(len(classes), per_class, figsize=(1.6 * per_class, 1.7 * len(classes)), squeeze=False)
    shards: dict[int, np.ndarray] = {}
    for r, label in enumerate(classes):
        rows = manifest[manifest["label"] == label]
        pick = rows.iloc[np.sort(rng.choice(len(rows), size=min(per_class, len(rows)), replace=False))]
        for c in range(per_class):
            ax = axes[r, c]
            ax.axis("off")
            if c >= len(pick):
                continue
            row = pick.iloc[c]
            shard = shards.setdefault(int(row["shard"]), np.load(shard_file(shard_dir, row["shard"]), mmap_mode="r"))
            ax.imshow(_shown(np.asarray(shard[int(row["index"])], dtype=np.float32)), cmap="inferno")
            if c == 0:
                ax.set_title(label, fontsize=9, loc="left")
    fig.suptitle("Prepared samples per class (after crop and resize)", fontsize=10)
    save_figure(path, fig)
