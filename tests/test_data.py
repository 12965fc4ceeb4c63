"""Prepared data sets (ssl4sci.data): the stored pixels for the multi-crop, normalised images otherwise."""
import torch
from conftest import PRETRAIN_CFG

from ssl4sci.ssl.augment import MultiCrop


def test_pretraining_views_start_from_the_stored_pixels_and_end_normalised(prepared):
    """``raw=True`` hands the multi-crop the stored values; each view is normalised with the dataset's statistics
    as the last step, so a whole-image view is the normalised image up to a symmetry."""
    from ssl4sci.data import ImageDataset, PreparedData

    data = PreparedData(prepared)
    rows = data.rows(["train"])
    stored = data.raw_image(int(rows["shard"].iloc[0]), int(rows["index"].iloc[0]))
    assert torch.equal(ImageDataset(data, rows, raw=True)[0][0], stored)
    assert torch.equal(ImageDataset(data, rows)[0][0], data.normalise(stored))
    cfg = dict(PRETRAIN_CFG, global_crop_size=data.image_size, global_crop_scale=[1.0, 1.0],
               augment={**PRETRAIN_CFG["augment"], "noise_std": 0.0, "blur_prob": 0.0})
    crop = MultiCrop(cfg, data.stats["mean"], data.stats["std"], "lensing")
    view = ImageDataset(data, rows, transform=crop, raw=True)[0][0]["views"][0]
    normalised = data.normalise(stored)
    dihedral = [torch.rot90(f, k, dims=(-2, -1)) for f in (normalised, normalised.flip(-1)) for k in range(4)]
    assert any(torch.equal(view, d) for d in dihedral)


def test_stored_rows_reads_a_batch_of_positions_as_stored(prepared):
    """Any positions, in their order, across shards, in the stored dtype: what the per-image reader gives before
    its float32 conversion."""
    import numpy as np

    from ssl4sci.data import ImageDataset, PreparedData, StoredRows

    data = PreparedData(prepared)
    rows = data.rows(["train", "val"])
    assert rows["shard"].nunique() > 1  # the batch below spans shards
    positions = [len(rows) - 1, 0, 5, 3, len(rows) // 2]
    batch = StoredRows(data, rows)[positions]
    assert batch.dtype == getattr(torch, np.dtype(data.stats["dtype"]).name) and batch.shape[0] == len(positions)
    one_by_one = ImageDataset(data, rows, raw=True)
    for got, position in zip(batch, positions):
        assert torch.equal(got.to(torch.float32), one_by_one[position][0])
