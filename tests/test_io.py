"""The streaming Parquet writer (ssl4sci.io.streaming_parquet): the same file as one written whole, or no file."""
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ssl4sci.io import streaming_parquet, write_parquet


def table_of(n: int) -> pa.Table:
    frame = pd.DataFrame({"id": [f"img-{i}" for i in range(n)], "label_id": range(n)})
    return pa.Table.from_pandas(frame, preserve_index=False)


def test_streamed_batches_make_the_file_a_whole_write_makes(tmp_path):
    whole = table_of(10)
    write_parquet(tmp_path / "whole.parquet", whole, metadata={"method": "dino", "embed_dim": 3})
    with streaming_parquet(tmp_path / "streamed.parquet", whole.schema, {"method": "dino", "embed_dim": 3},
                           row_group_rows=4) as out:
        for start in range(0, 10, 3):  # batches of 3 held back into row groups of at least 4 rows
            out.write(whole.slice(start, 3))
        assert out.rows == 10
    streamed = pq.read_table(tmp_path / "streamed.parquet")
    assert streamed.equals(pq.read_table(tmp_path / "whole.parquet"))
    assert streamed.schema.equals(pq.read_table(tmp_path / "whole.parquet").schema, check_metadata=True)
    assert pq.ParquetFile(tmp_path / "streamed.parquet").metadata.num_row_groups == 2  # 6 + 4 rows
    with streaming_parquet(tmp_path / "empty.parquet", whole.schema):
        pass
    assert pq.read_table(tmp_path / "empty.parquet").schema.equals(whole.schema)


def test_a_failure_half_way_leaves_no_file_and_no_temporary(tmp_path):
    whole = table_of(10)
    with pytest.raises(RuntimeError, match="half-way"):
        with streaming_parquet(tmp_path / "out.parquet", whole.schema, row_group_rows=2) as out:
            out.write(whole.slice(0, 5))  # a row group is on disk already
            raise RuntimeError("half-way")
    assert list(tmp_path.iterdir()) == []
