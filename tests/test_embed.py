"""The embed stage (ssl4sci.embed) on the tiny prepared fixture: a pretrained teacher, and a public timm model."""
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import MODEL_CFG, default_section

from ssl4sci.embed import embed


def test_embeddings_have_declared_width_provenance_and_every_image(prepared, checkpoint, tmp_path):
    out = embed(prepared, tmp_path / "dino.parquet", "dino", checkpoint, {"batch_size": 16, "seed": 0}, MODEL_CFG,
                device="cpu")
    table = pq.read_table(out)
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert meta["method"] == "dino" and len(meta["checkpoint_sha256"]) == 64
    dim = int(meta["embed_dim"])
    assert table.schema.field("embedding").type.list_size == dim == 192
    emb = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)
    assert emb.shape[0] == 36 and np.isfinite(emb).all()
    # the teacher backbone, not a fresh one: embeddings differ from random init of the same seed
    rand = embed(prepared, tmp_path / "r.parquet", "random_init", None, {"batch_size": 16, "seed": 0}, MODEL_CFG,
                 device="cpu")
    remb = pq.read_table(rand).column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)
    assert not np.allclose(emb, remb)
    assert set(table.column("split").to_pylist()) == {"train", "val", "test"}


def test_embed_with_a_public_timm_model_from_a_local_weight_file(prepared, tmp_path):
    """A timm baseline: weights from a local file, images normalised with the model's own statistics."""
    import timm

    from ssl4sci.baselines import baseline_normalisation
    from ssl4sci.data import PreparedData

    torch.manual_seed(1)
    public = timm.create_model("vit_tiny_patch16_224", num_classes=0, in_chans=1, img_size=32).eval()
    weights = tmp_path / "public.pth"
    torch.save(public.state_dict(), weights)
    out = embed(prepared, tmp_path / "timm.parquet", "timm_vit_tiny", None, {"batch_size": 16, "seed": 0}, MODEL_CFG,
                device="cpu", timm={"name": "vit_tiny_patch16_224", "weights": str(weights)})
    table = pq.read_table(out)
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert meta["method"] == "timm_vit_tiny" and meta["checkpoint_sha256"] != ""
    emb = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(len(table), -1)
    data = PreparedData(prepared)
    mean, std = (torch.tensor(v).view(-1, 1, 1) for v in baseline_normalisation(public, 1))
    row = data.rows().iloc[0]
    with torch.no_grad():
        expected = public(((data.raw_image(int(row["shard"]), int(row["index"])) - mean) / std)[None])[0].numpy()
    np.testing.assert_allclose(emb[0], expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- the streaming, on-device export
def host_normalised_export(data_dir, backbone, tmp_path):
    """The export as the stage wrote it before streaming: every image normalised on the host (ImageDataset), all
    features in memory, the whole table written at once."""
    import pyarrow as pa

    from ssl4sci.data import LABELLED_SPLITS, ImageDataset, PreparedData
    from ssl4sci.features import extract_features
    from ssl4sci.io import write_parquet

    data = PreparedData(data_dir)
    rows = data.rows(LABELLED_SPLITS).reset_index(drop=True)
    feats = extract_features(backbone, ImageDataset(data, rows), 16, torch.device("cpu"))
    table = pa.Table.from_pandas(rows, preserve_index=False)
    table = table.append_column("embedding", pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), 192))
    metadata = {"method": "random_init", "model": MODEL_CFG["name"],
                "checkpoint_sha256": "none (random init, seed 0)", "image_size": data.image_size, "embed_dim": 192,
                "feature": "CLS token of the last block (pre-logits)"}
    write_parquet(tmp_path / "whole.parquet", table, metadata=metadata)
    return pq.read_table(tmp_path / "whole.parquet")


@pytest.fixture(scope="module")
def prepared_uint8(tmp_path_factory):
    """The rings prepared into uint8 shards (the photo layout: stored values / 255 before normalisation)."""
    from conftest import PREPARE_CFG, make_raw

    from ssl4sci.prepare import prepare

    root = tmp_path_factory.mktemp("uint8")
    prepare(make_raw(root / "raw", n_per_class=4), root / "data", dict(PREPARE_CFG, dtype="uint8"), source="test")
    return root / "data"


@pytest.mark.parametrize("stored", ["float16", "uint8"])
@pytest.mark.parametrize("num_workers", [0, 3])
def test_streamed_on_device_export_equals_the_host_normalised_whole_file(stored, num_workers, prepared,
                                                                         prepared_uint8, tmp_path):
    """Batches cross as stored (uint8 stays uint8) and are normalised on the device; rows are appended batch by batch
    (batch 5 over shards of 7: batches span shards, the last is short): the same file as one written whole."""
    from ssl4sci.data import LABELLED_SPLITS, PreparedData
    from ssl4sci.embed import stored_batches
    from ssl4sci.models import create_backbone

    data_dir = prepared if stored == "float16" else prepared_uint8
    data = PreparedData(data_dir)
    first = next(iter(stored_batches(data, data.rows(LABELLED_SPLITS), 5, 0, torch.device("cpu"))))
    assert first.dtype == getattr(torch, stored) and first.shape[0] == 5
    torch.manual_seed(0)
    expected = host_normalised_export(data_dir, create_backbone(MODEL_CFG, 1, 32, drop_path_rate=0.0), tmp_path)
    cfg = default_section("embed", batch_size=5, num_workers=num_workers)
    streamed = pq.read_table(embed(data_dir, tmp_path / "streamed.parquet", "random_init", None, cfg, MODEL_CFG,
                                   device="cpu"))
    assert streamed.schema.equals(expected.schema, check_metadata=True)
    assert list(streamed.schema.metadata) == [b"pandas", b"method", b"model", b"checkpoint_sha256", b"image_size",
                                              b"embed_dim", b"feature"]
    assert streamed.drop_columns(["embedding"]).equals(expected.drop_columns(["embedding"]))
    np.testing.assert_allclose(streamed.column("embedding").combine_chunks().flatten().to_numpy(),
                               expected.column("embedding").combine_chunks().flatten().to_numpy(),
                               rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["streamed.parquet", "whole.parquet"]  # no temporary left


def test_stored_images_keep_the_stored_values_in_row_order_across_shards(prepared_uint8):
    """What the stage's readers hand over: the stored uint8 values (raw_image / 255 of them), in the order asked,
    from batches that span shards, returned or written into a given buffer."""
    from ssl4sci.data import PreparedData, StoredBatches

    data = PreparedData(prepared_uint8)
    rows = data.rows().iloc[::-1]  # reversed: every batch reads shards out of order
    assert rows["shard"].nunique() > 1
    shards, indices = rows["shard"].to_numpy(), rows["index"].to_numpy()
    expected = np.stack([data.raw_image(int(s), int(i)).numpy() for s, i in zip(shards, indices)])
    into = np.zeros((len(rows),) + expected.shape[1:], np.uint8)
    for stored in (data.stored_images(shards, indices), data.stored_images(shards, indices, out=into), into):
        assert stored.dtype == np.uint8
        np.testing.assert_allclose(stored / np.float32(255.0), expected, rtol=0, atol=0)
    batches = StoredBatches(data, rows, 5)
    assert len(batches) == -(-len(rows) // 5)
    np.testing.assert_array_equal(torch.cat([batches[b] for b in range(len(batches))]).numpy(), into)
    with pytest.raises(IndexError):
        batches[len(batches)]


class DivergesAtSecondBatch(torch.nn.Module):
    """A stand-in backbone whose features turn non-finite from its second batch on (a diverging model mid-run)."""

    num_features = 2

    def __init__(self):
        super().__init__()
        self.batches = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches += 1
        features = x.mean(dim=(2, 3)).repeat(1, 2)[:, :2]
        return features if self.batches == 1 else features * float("inf")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_non_finite_features_mid_way_fail_the_stage_and_leave_no_file(num_workers, prepared, tmp_path):
    from ssl4sci.data import LABELLED_SPLITS, PreparedData
    from ssl4sci.embed import write_embeddings

    data = PreparedData(prepared)
    backbone = DivergesAtSecondBatch()
    out = tmp_path / "out" / "dino.parquet"
    try:
        write_embeddings(out, backbone, data, data.rows(LABELLED_SPLITS),
                         default_section("embed", batch_size=8, num_workers=num_workers),
                         torch.device("cpu"), (data.mean, data.std), {"method": "dino"}, "dino", "last.ckpt")
    except FloatingPointError as failure:
        assert "dino: non-finite embeddings; the checkpoint last.ckpt is probably diverged" in str(failure)
        # checked while the traceback still holds the stage's frame: the readers stop with the stage, not later
        assert not [t for t in threading.enumerate() if t.name.startswith("ssl4sci-embed-read")]
    else:
        pytest.fail("non-finite embeddings were written")
    assert backbone.batches >= 2  # the first batch's rows went to the file before the failure
    assert list(out.parent.iterdir()) == []  # neither the file nor its temporary


def test_compile_that_fails_falls_back_to_eager_with_one_line(prepared, tmp_path, capfd):
    """embed.compile with a backend torch.compile rejects: one warning line naming the key, the eager embeddings."""
    eager = embed(prepared, tmp_path / "eager.parquet", "random_init", None, default_section("embed", batch_size=16),
                  MODEL_CFG, device="cpu")
    capfd.readouterr()
    cfg = default_section("embed", batch_size=16, compile="no_such_backend")
    fallback = embed(prepared, tmp_path / "fallback.parquet", "random_init", None, cfg, MODEL_CFG, device="cpu")
    lines = [line for line in capfd.readouterr().err.splitlines() if "torch.compile" in line]
    assert len(lines) == 1 and "embed.compile" in lines[0] and "no_such_backend" in lines[0], lines
    assert "running eagerly" in lines[0]
    assert pq.read_table(fallback).equals(pq.read_table(eager))


def test_compile_with_a_working_backend_gives_the_eager_embeddings(prepared, tmp_path, capfd):
    from ssl4sci.embed import compile_backbone
    from ssl4sci.models import create_backbone

    cpu, shape = torch.device("cpu"), (4, 1, 32, 32)
    assert compile_backbone(create_backbone(MODEL_CFG, 1, 32), "eager", shape, cpu) is True
    assert compile_backbone(create_backbone(MODEL_CFG, 1, 32), False, shape, cpu) is False
    eager = embed(prepared, tmp_path / "eager.parquet", "random_init", None, default_section("embed", batch_size=16),
                  MODEL_CFG, device="cpu")
    cfg = default_section("embed", batch_size=16, compile="eager")  # dynamo's tracing, no C compiler needed
    compiled = embed(prepared, tmp_path / "compiled.parquet", "random_init", None, cfg, MODEL_CFG, device="cpu")
    assert "torch.compile" not in capfd.readouterr().err
    np.testing.assert_allclose(pq.read_table(compiled).column("embedding").combine_chunks().flatten().to_numpy(),
                               pq.read_table(eager).column("embedding").combine_chunks().flatten().to_numpy(),
                               rtol=1e-5, atol=1e-5)
