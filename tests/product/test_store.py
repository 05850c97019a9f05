"""Embeddings files: every format round-trips vectors, ids, labels, paths and metadata; bad files are clear errors."""

import json

import numpy as np
import pytest

from deepmetric.errors import DataError
from deepmetric.product import Embeddings


def sample(labels=True, paths=True) -> Embeddings:
    rng = np.random.default_rng(0)
    return Embeddings(rng.standard_normal((5, 3)).astype(np.float32), [f"test/{i}" for i in range(5)],
                      np.array([3, 1, 4, 1, 5]) if labels else None,
                      [f"/data/{i}.png" for i in range(5)] if paths else None,
                      {"distance": "cosine", "data": {"name": "digits", "split": "test"}})


@pytest.mark.parametrize("suffix", [".npz", ".parquet", ".npy"])
@pytest.mark.parametrize("labels,paths", [(True, True), (False, False), (True, False)])
def test_round_trip(tmp_path, suffix, labels, paths):
    e = sample(labels, paths)
    back = Embeddings.load(e.save(tmp_path / f"e{suffix}"))
    np.testing.assert_array_equal(back.vectors, e.vectors)
    assert back.vectors.dtype == np.float32
    assert back.ids == e.ids and back.paths == e.paths and back.metadata == e.metadata
    if labels:
        np.testing.assert_array_equal(back.labels, e.labels)
        assert back.labels.dtype == np.int64
    else:
        assert back.labels is None


def test_a_bare_npy_reads_with_row_numbers_as_ids(tmp_path):
    np.save(tmp_path / "x.npy", np.eye(3, dtype=np.float64))
    e = Embeddings.load(tmp_path / "x.npy")
    assert e.ids == ["0", "1", "2"] and e.labels is None and e.vectors.dtype == np.float32


def test_bad_contents_are_refused(tmp_path):
    with pytest.raises(DataError, match="unique; repeated: a"):
        Embeddings(np.zeros((2, 3)), ["a", "a"])
    with pytest.raises(DataError, match="2 ids for 3"):
        Embeddings(np.zeros((3, 3)), ["a", "b"])
    with pytest.raises(DataError, match="labels must be 2 integers"):
        Embeddings(np.zeros((2, 3)), ["a", "b"], np.array([0.5, 1.0]))
    with pytest.raises(DataError, match="2-D"):
        Embeddings(np.zeros(3), ["a", "b", "c"])
    with pytest.raises(DataError, match="NaN"):
        Embeddings(np.full((1, 2), np.nan), ["a"])
    with pytest.raises(DataError, match="must end in one of"):
        sample().save(tmp_path / "e.csv")
    with pytest.raises(DataError, match="not found"):
        Embeddings.load(tmp_path / "missing.npz")
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read"):
        Embeddings.load(tmp_path / "broken.npz")


def test_partly_missing_parquet_labels_are_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    flat = pa.array(np.zeros(4, np.float32))
    pq.write_table(pa.table({"id": ["a", "b"], "label": pa.array([1, None], pa.int64()),
                             "embedding": pa.FixedSizeListArray.from_arrays(flat, 2)}), tmp_path / "e.parquet")
    with pytest.raises(DataError, match="1 of 2 labels are missing"):
        Embeddings.load(tmp_path / "e.parquet")


def test_npy_sidecar_is_plain_json(tmp_path):
    sample().save(tmp_path / "e.npy")
    side = json.loads((tmp_path / "e.npy.json").read_text())
    assert side["ids"][0] == "test/0" and side["labels"] == [3, 1, 4, 1, 5]
