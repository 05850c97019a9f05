"""``evaluate`` against the brute-force reference, in every mode, backend and chunking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepmetric.errors import ConfigError, InputError, LabelError
from deepmetric.evaluation import METRICS, evaluate

RETRIEVAL = ["recall@k", "precision@k", "ndcg@k", "r_precision", "map@r", "map"]
KINDS = ["random", "clustered", "duplicates", "grid", "singletons"]


def assert_matches(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


# Not (grid, cosine): cosine ties between distinct integer vectors are not exact in floating point.
KIND_DISTANCE = [(k, d) for k in KINDS for d in ("cosine", "euclidean") if (k, d) != ("grid", "cosine")]


@pytest.mark.parametrize(("kind", "distance"), KIND_DISTANCE)
@pytest.mark.parametrize(("backend", "budget"), [("torch", 2**20), ("torch", 4096), ("faiss", 4096)])
def test_leave_one_out_equals_reference(data, reference, kind, distance, backend, budget):
    x, y = data(kind)
    want = reference(x, y, distance=distance)
    got = evaluate(x, y, metrics=RETRIEVAL, distance=distance, backend=backend, memory_budget=budget)
    assert_matches(got, want)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lone", ["skip", "miss"])
def test_split_mode_equals_reference(data, reference, kind, lone):
    distance = "euclidean" if kind == "grid" else "cosine"
    x, y = data(kind, seed=1)
    xq, yq = data(kind, seed=2, n=50)
    if kind == "duplicates":  # queries that duplicate gallery items
        xq = x[np.random.default_rng(3).integers(0, len(x), 50)]
    want = reference(x, y, xq, yq, distance=distance, lone=lone)
    got = evaluate(
        x, y, query_embeddings=xq, query_labels=yq, metrics=RETRIEVAL, lone_queries=lone, distance=distance,
        backend="torch", memory_budget=4096,
    )
    assert_matches(got, want)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("budget", [2**30, 8192])
def test_knn_only_metrics_equal_reference_on_every_path(data, reference, kind, backend, budget):
    """Without ``map`` the kNN comes from knn(): faiss, chunked torch or the symmetric block pass."""
    distance = "euclidean" if kind == "grid" else "cosine"
    x, y = data(kind, n=150)
    want = reference(x, y, distance=distance)
    del want["map"]
    got = evaluate(x, y, metrics=RETRIEVAL[:-1], distance=distance, backend=backend, memory_budget=budget)
    assert_matches(got, want)


def test_singletons_skip_and_miss(data, reference):
    x, y = data("singletons")
    skip = evaluate(x, y, metrics=["recall@1", "map@r"])
    miss = evaluate(x, y, metrics=["recall@1", "map@r"], lone_queries="miss")
    assert skip["n_lone_queries"] == miss["n_lone_queries"] == reference(x, y)["n_lone_queries"] > 0
    n = len(y)
    assert miss["recall@1"] == pytest.approx(skip["recall@1"] * (n - skip["n_lone_queries"]) / n)


def test_all_keys_and_types(data):
    x, y = data("clustered")
    out = evaluate(torch.from_numpy(x), torch.from_numpy(y))
    expected = {f"{m}@{k}" for m in ("recall", "precision", "ndcg") for k in (1, 2, 4, 8)}
    expected |= {"r_precision", "map@r", "map", "nmi", "ami", "f1", "n_lone_queries"}
    assert set(out) == expected
    assert all(isinstance(v, (int, float)) for v in out.values())
    assert out["precision@1"] == out["recall@1"]


def test_metric_selection():
    x = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
    y = np.arange(40) % 5
    assert set(evaluate(x, y, metrics=["recall@1", "nmi"])) == {"recall@1", "n_lone_queries", "nmi"}
    assert set(evaluate(x, y, metrics="precision@k", ks=(1, 3))) == {"precision@1", "precision@3", "n_lone_queries"}
    with pytest.raises(ConfigError, match="valid: recall@k"):
        evaluate(x, y, metrics=["recal@1"])


def test_per_class_breakdown_averages_to_total(data):
    x, y = data("clustered")
    out = evaluate(x, y, metrics=["recall@1"], per_class=True)
    per = [out[f"recall@1/class={c}"] for c in np.unique(y)]
    counts = np.bincount(y)[np.unique(y)]
    assert np.average(per, weights=counts) == pytest.approx(out["recall@1"])


def test_half_precision_and_numpy_and_torch_agree(data):
    x, y = data("clustered")
    a = evaluate(x, y, metrics=RETRIEVAL)
    b = evaluate(torch.from_numpy(x).half(), torch.from_numpy(y), metrics=RETRIEVAL)
    assert a["recall@1"] == pytest.approx(b["recall@1"], abs=0.02)
    assert evaluate(torch.from_numpy(x), torch.from_numpy(y).int(), metrics=RETRIEVAL) == a


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(embeddings=np.full((4, 2), np.nan, np.float32)), InputError, "NaN or Inf"),
        (dict(embeddings=np.zeros((4,), np.float32), labels=np.arange(4)), InputError, r"\[N, D\]"),
        (dict(labels=np.arange(3)), LabelError, "3 entries"),
        (dict(labels=np.array([0.5, 1, 2, 3])), LabelError, "integer"),
        (dict(labels=np.array(["a", "b", "c", "d"])), LabelError, "integer"),
        (dict(embeddings=np.zeros((0, 2), np.float32), labels=np.arange(0)), InputError, "empty"),
        (dict(ks=(1, 4)), InputError, "k=4 is larger than the 3"),
        (dict(ks=(0,)), ConfigError, "positive"),
        (dict(distance="cos"), ConfigError, "cosine"),
        (dict(backend="gpu"), ConfigError, "backend"),
        (dict(lone_queries="drop"), ConfigError, "lone_queries"),
        (dict(query_embeddings=np.zeros((2, 2), np.float32)), InputError, "both"),
        (dict(query_embeddings=np.ones((2, 3), np.float32), query_labels=[0, 1]), InputError, "dimensions"),
        (dict(embeddings=np.arange(8).reshape(4, 2)), InputError, "floating point"),
        (dict(memory_budget="lots"), ConfigError, "memory_budget"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = dict(embeddings=np.ones((4, 2), np.float32) + np.eye(4, 2, dtype=np.float32), labels=np.array([0, 0, 1, 1]))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        evaluate(args.pop("embeddings"), args.pop("labels"), **args)


def test_all_lone_gives_nan_with_warning():
    x = np.eye(4, dtype=np.float32)
    with pytest.warns(RuntimeWarning, match="lone"):
        out = evaluate(x, np.arange(4), metrics=["recall@1"])
    assert np.isnan(out["recall@1"]) and out["n_lone_queries"] == 4


def test_metrics_constant_lists_every_family():
    assert set(METRICS) == {"recall@k", "precision@k", "ndcg@k", "r_precision", "map@r", "map", "nmi", "ami", "f1"}


def test_equals_pytorch_metric_learning(data):
    """precision_at_1, r_precision and MAP@R equal PML's AccuracyCalculator (no ties in this data)."""
    pml = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    x, y = data("clustered", n=400, d=16)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)  # PML ranks by L2: identical to cosine here
    calc = pml.AccuracyCalculator(include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
                                  k="max_bin_count", device=torch.device("cpu"))
    want = calc.get_accuracy(torch.from_numpy(x), torch.from_numpy(y))
    got = evaluate(x, y, metrics=["recall@1", "r_precision", "map@r"])
    assert got["recall@1"] == pytest.approx(want["precision_at_1"], abs=1e-6)
    assert got["r_precision"] == pytest.approx(want["r_precision"], abs=1e-6)
    assert got["map@r"] == pytest.approx(want["mean_average_precision_at_r"], abs=1e-6)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("metrics", [RETRIEVAL, RETRIEVAL[:-1]])
def test_k_as_large_as_the_gallery(data, reference, backend, metrics):
    x, y = data("duplicates", n=30)
    want = {k: v for k, v in reference(x, y, ks=(29,)).items() if k != "map" or "map" in metrics}
    assert_matches(evaluate(x, y, metrics=metrics, ks=(29,), backend=backend, memory_budget=4096), want)
