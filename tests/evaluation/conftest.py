"""Shared fixtures for the evaluation tests: data sets and a brute-force numpy reference.

The reference is written independently of the library: float64 distances, a full ``np.lexsort`` per
query with the documented key (distance asc, gallery index asc), and the metric formulas of
``docs``/evaluation.md spelled out with Python loops.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch


def reference_metrics(g, yg, q=None, yq=None, *, ks=(1, 2, 4, 8), distance="cosine", lone="skip"):
    """Every retrieval metric by brute force (leave-one-out when q is None)."""
    loo = q is None
    g = np.asarray(g, dtype=np.float64)
    q, yq = (g, yg) if loo else (np.asarray(q, dtype=np.float64), yq)
    if distance == "cosine":
        qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        gn = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
        dist = 1.0 - qn @ gn.T
    else:
        dist = np.sqrt(((q[:, None, :] - g[None, :, :]) ** 2).sum(-1))
    per_query: dict[str, list[float]] = {}
    n_lone = 0
    for i in range(len(q)):
        idx = np.arange(len(g))
        if loo:
            idx = idx[idx != i]
        order = idx[np.lexsort((idx, dist[i, idx]))]
        rel = (np.asarray(yg)[order] == yq[i]).astype(float)
        r = int(rel.sum())
        if r == 0:
            n_lone += 1
            if lone == "skip":
                continue
        vals = {}
        for k in ks:
            vals[f"recall@{k}"] = float(rel[:k].any())
            vals[f"precision@{k}"] = rel[:k].sum() / k
            dcg = sum(rel[j] / math.log2(j + 2) for j in range(k))
            idcg = sum(1 / math.log2(j + 2) for j in range(min(k, r)))
            vals[f"ndcg@{k}"] = dcg / idcg if idcg else 0.0
        prec = np.cumsum(rel) / np.arange(1, len(rel) + 1)
        vals["r_precision"] = rel[:r].sum() / r if r else 0.0
        vals["map@r"] = (rel[:r] * prec[:r]).sum() / r if r else 0.0
        vals["map"] = (rel * prec).sum() / r if r else 0.0
        for key, v in vals.items():
            per_query.setdefault(key, []).append(v)
    out = {key: float(np.mean(v)) for key, v in per_query.items()}
    out["n_lone_queries"] = n_lone
    return out


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP wake-up latency on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def reference():
    return reference_metrics


def make_data(kind: str, seed: int = 0, n: int = 120, d: int = 8):
    """(embeddings float32, labels int64) of a named shape of data."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, 6, n)
    if kind == "clustered":
        y = rng.integers(0, 10, n)
        centres = rng.normal(size=(10, d))
        return (centres[y] + 0.6 * rng.normal(size=(n, d))).astype(np.float32), y
    if kind == "duplicates":  # a few distinct vectors repeated: ties everywhere, exact in float32
        base = rng.normal(size=(7, d))
        return base[rng.integers(0, 7, n)].astype(np.float32), rng.integers(0, 4, n)
    if kind == "grid":  # small integer vectors: many exact distance ties between distinct vectors
        return rng.integers(-2, 3, size=(n, 3)).astype(np.float32), rng.integers(0, 5, n)
    if kind == "singletons":  # many one-item classes -> lone queries
        y = np.concatenate([np.arange(n // 2), rng.integers(0, 5, n - n // 2)])
        return rng.normal(size=(n, d)).astype(np.float32), y
    raise ValueError(kind)


@pytest.fixture
def data():
    return make_data
