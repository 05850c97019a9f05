"""Exact kNN: every backend and code path against a full stable sort, ties, self-exclusion, devices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepmetric import matmul
from deepmetric.errors import ConfigError, InputError
from deepmetric.evaluation import knn
from deepmetric.evaluation.knn import _knn_chunked, _knn_faiss_symmetric, chunk_rows, parse_memory_budget, symmetric_block


def brute_force(q, g, k, distance, loo):
    q64, g64 = q.astype(np.float64), g.astype(np.float64)
    if distance == "cosine":
        q64 = q64 / np.linalg.norm(q64, axis=1, keepdims=True)
        g64 = g64 / np.linalg.norm(g64, axis=1, keepdims=True)
        d = 1 - q64 @ g64.T
    else:
        d = np.sqrt(((q64[:, None] - g64[None]) ** 2).sum(-1))
    if loo:
        np.fill_diagonal(d, np.inf)
    idx = np.arange(g.shape[0])
    order = np.array([np.lexsort((idx, row))[:k] for row in d])
    return np.take_along_axis(d, order, 1), order


PATHS = [("torch", 2**30), ("torch", 8192), ("faiss", 2**30), ("faiss", 2**17)]


@pytest.mark.parametrize(("backend", "budget"), PATHS)
@pytest.mark.parametrize("kind", ["clustered", "duplicates", "grid"])
@pytest.mark.parametrize("loo", [True, False])
def test_knn_equals_full_stable_sort(data, backend, budget, kind, loo):
    distance = "euclidean" if kind == "grid" else "cosine"
    x, _ = data(kind, n=150)
    q = x if loo else data(kind, seed=5, n=40)[0]
    dist, idx = knn(torch.from_numpy(q), None if loo else torch.from_numpy(x), 10, distance=distance,
                    backend=backend, memory_budget=budget)
    want_d, want_i = brute_force(q, x, 10, distance, loo)
    np.testing.assert_array_equal(idx.numpy(), want_i)
    np.testing.assert_allclose(dist.numpy(), want_d, atol=1e-5)
    assert dist.dtype == torch.float32 and idx.dtype == torch.int64


@pytest.mark.parametrize(("n", "block", "d"), [(300, 64, 8), (30, 22, 8), (500, 128, 130)])
def test_symmetric_pass_equals_chunked_pass(data, n, block, d):
    x, _ = data("duplicates", n=n, d=d)
    op = torch.nn.functional.normalize(torch.from_numpy(x), dim=1)
    for k in (1, 5, 29, n - 1):
        sym = _knn_faiss_symmetric(op, k, block=block)
        chunked = _knn_chunked(op, op, k, True, 2**30)
        assert torch.equal(sym[1], chunked[1])
        torch.testing.assert_close(sym[0], chunked[0], atol=1e-6, rtol=0)


def test_symmetric_block_choice():
    assert symmetric_block(300, 2**30) == 0  # a single block: nothing to share
    assert 0 < symmetric_block(150, 2**17) < 150  # so PATHS' faiss case with 128 KiB runs the symmetric pass


def test_duplicates_rank_by_index_and_count_as_neighbours():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.6, 0.8]])
    for backend in ("torch", "faiss"):
        d, i = knn(x, k=3, backend=backend)
        assert i[0].tolist() == [2, 3, 4]  # duplicates 2 and 3 first, in index order, at distance 0
        assert i[2].tolist() == [0, 3, 4]  # self (2) excluded by index, not its duplicates
        assert d[0, :2].tolist() == [0.0, 0.0]


def test_half_and_numpy_free_inputs():
    x = torch.randn(50, 8)
    d16, i16 = knn(x.half(), k=3, backend="torch")
    assert d16.dtype == torch.float32
    d32, i32 = knn(x.half().float(), k=3, backend="torch")
    assert torch.equal(i16, i32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu():
    x = torch.randn(3000, 32)
    d, i = knn(x, k=5, backend="torch")
    dc, ic = knn(x.cuda(), k=5, backend="auto")
    assert ic.device.type == "cuda" and torch.equal(ic.cpu(), i)
    torch.testing.assert_close(dc.cpu(), d, atol=1e-5, rtol=0)


def test_chunk_rows_respects_budget():
    assert chunk_rows(60502, 512 * 2**20) * 60502 * 12 <= 512 * 2**20
    assert chunk_rows(10**9, 2**10) == 1
    assert parse_memory_budget("512MB") == parse_memory_budget("512 MiB") == 512 * 2**20
    assert parse_memory_budget("1.5g") == 3 * 2**29


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(k=50), InputError, "k=50 is larger than the 49"),
        (dict(k=0), InputError, "positive"),
        (dict(distance="l2"), ConfigError, "distance"),
        (dict(backend="annoy"), ConfigError, "backend"),
        (dict(memory_budget=10), ConfigError, "1 KiB"),
    ],
)
def test_knn_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        knn(torch.randn(50, 4), **kwargs)


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize("loo", [True, False])
@pytest.mark.parametrize("onednn", [False, True], ids=["torch.mm", "onednn"])
def test_faiss_blocks_keep_duplicate_ties(data, distance, loo, onednn, monkeypatch):
    """faiss computes the gallery in blocks of 1024, the symmetric pass (cosine, leave-one-out) in two
    1504 x 1504 tiles, by torch.mm or oneDNN; duplicates across blocks must still tie exactly."""
    if onednn and not matmul.AVAILABLE:
        pytest.skip("oneDNN's linear op does not run here")
    monkeypatch.setattr(matmul, "ONEDNN", onednn)
    x, _ = data("duplicates", n=3000, d=64)
    q = x if loo else data("duplicates", seed=3, n=100, d=64)[0]
    args = (torch.from_numpy(q), None if loo else torch.from_numpy(x), 50)
    faiss_result = knn(*args, distance=distance, backend="faiss")  # flat index, or the symmetric pass
    torch_result = knn(*args, distance=distance, backend="torch")
    assert torch.equal(faiss_result.indices, torch_result.indices)
