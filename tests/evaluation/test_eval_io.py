"""Array files, the results table and JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deepmetric.errors import DataError, InputError
from deepmetric.evaluation import evaluate, evaluate_files, format_table, load_array, write_json


@pytest.fixture
def arrays():
    rng = np.random.default_rng(0)
    return rng.normal(size=(60, 8)).astype(np.float32), np.arange(60) % 6


def test_load_every_format(tmp_path, arrays):
    x, y = arrays
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "one.npz", x)
    np.savez(tmp_path / "two.npz", embeddings=x, labels=y)
    torch.save(torch.from_numpy(x).bfloat16(), tmp_path / "x.pt")
    torch.save({"labels": torch.from_numpy(y)}, tmp_path / "d.pt")
    np.testing.assert_array_equal(load_array(tmp_path / "x.npy"), x)
    np.testing.assert_array_equal(load_array(tmp_path / "one.npz"), x)
    np.testing.assert_array_equal(load_array(tmp_path / "two.npz", key="labels"), y)
    np.testing.assert_array_equal(load_array(f"{tmp_path / 'two.npz'}:embeddings"), x)
    np.testing.assert_allclose(load_array(tmp_path / "x.pt"), x, rtol=1e-2)
    np.testing.assert_array_equal(load_array(tmp_path / "d.pt"), y)
    with pytest.raises(DataError, match="name one"):
        load_array(tmp_path / "two.npz")
    with pytest.raises(DataError, match="does not exist"):
        load_array(tmp_path / "missing.npy")
    with pytest.raises(DataError, match="unsupported"):
        load_array(tmp_path / "x.csv")


def test_evaluate_files_matches_evaluate(tmp_path, arrays):
    x, y = arrays
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    got = evaluate_files(tmp_path / "x.npy", tmp_path / "y.npy", metrics=["recall@k", "map@r"])
    assert got == evaluate(x, y, metrics=["recall@k", "map@r"])
    split = evaluate_files(
        tmp_path / "x.npy", tmp_path / "y.npy", tmp_path / "x.npy", tmp_path / "y.npy", metrics=["recall@1"]
    )
    assert split["recall@1"] == 1.0  # every query finds itself in the gallery
    with pytest.raises(InputError, match="both"):
        evaluate_files(tmp_path / "x.npy", tmp_path / "y.npy", tmp_path / "x.npy")


def test_table_and_json(tmp_path):
    results = {"recall@1": 0.91234567, "n_lone_queries": 3, "nmi": float("nan")}
    table = format_table(results).splitlines()
    assert table[0].split() == ["metric", "value"]
    assert table[2].split() == ["recall@1", "0.9123"] and table[3].split() == ["n_lone_queries", "3"]
    path = write_json(results, tmp_path / "out" / "metrics.json")
    assert json.loads(path.read_text()) == {"recall@1": 0.91234567, "n_lone_queries": 3, "nmi": None}
