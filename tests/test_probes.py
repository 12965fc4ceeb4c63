"""Reading an embeddings file (ssl4sci.probes.load_embeddings)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from conftest import write_embeddings

from ssl4sci.probes import load_embeddings


def test_load_embeddings_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(7, 4)).astype(np.float32)
    p = write_embeddings(tmp_path / "e.parquet", emb, [0, 1, 2, 0, 1, 2, 0], ["train"] * 4 + ["test"] * 3)
    df, x, meta = load_embeddings(p)
    assert x.dtype == np.float32 and x.shape == (7, 4)
    np.testing.assert_array_equal(x, emb)
    assert "embedding" not in df.columns
    assert list(df["label"])[:3] == ["no_sub", "cdm", "axion"]
    assert meta["method"] == "dino" and meta["embed_dim"] == "4" and meta["checkpoint_sha256"] == "ab" * 32


def test_load_embeddings_multiple_row_groups(tmp_path):
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(10, 3)).astype(np.float32)
    table = pa.table(
        {
            "id": [str(i) for i in range(10)],
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), 3),
        }
    )
    pq.write_table(table, tmp_path / "e.parquet", row_group_size=3)
    _, x, _ = load_embeddings(tmp_path / "e.parquet")
    np.testing.assert_array_equal(x, emb)
