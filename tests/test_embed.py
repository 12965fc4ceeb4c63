"""The embed stage (ssl4sci.embed) on the tiny prepared fixture: a pretrained teacher, and a public timm model."""
import numpy as np
import pyarrow.parquet as pq
import torch
from conftest import MODEL_CFG

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
