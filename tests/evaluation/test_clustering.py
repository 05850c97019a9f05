"""Clustering metrics: equal to sklearn, fast exact EMI, pairwise F1 by hand and by brute force."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

from deepmetric.errors import ConfigError
from deepmetric.evaluation import clustering, evaluate

CASES = [
    (200, 5, 7),
    (1000, 60, 40),
    (3000, 600, 500),  # many small groups: where the distinct-size EMI differs most from sklearn's loop
    (50, 50, 50),  # all singletons
    (30, 1, 4),  # one class
    (30, 1, 1),  # one class, one cluster
]


@pytest.mark.parametrize(("n", "k_true", "k_pred"), CASES)
@pytest.mark.parametrize("average", ["arithmetic", "geometric"])
def test_nmi_ami_equal_sklearn(n, k_true, k_pred, average):
    rng = np.random.default_rng(n + k_true)
    t = rng.integers(0, k_true, n) if k_true < n else np.arange(n)
    p = np.where(rng.random(n) < 0.5, t % max(k_pred, 1), rng.integers(0, k_pred, n))
    assert clustering.nmi(t, p, average) == pytest.approx(normalized_mutual_info_score(t, p, average_method=average), abs=1e-12)
    assert clustering.ami(t, p, average) == pytest.approx(adjusted_mutual_info_score(t, p, average_method=average), abs=1e-10)


def test_identical_labelings():
    t = np.repeat(np.arange(10), 3)
    assert clustering.nmi(t, t + 100) == pytest.approx(1.0) and clustering.ami(t, t + 100) == pytest.approx(1.0)
    assert clustering.pairwise_f1(t, t + 100) == 1.0


def test_emi_at_sop_scale_is_fast():
    """11,316 classes of 2-16 items (SOP-sized): sklearn's EMI takes ~25 s here; ours must not."""
    rng = np.random.default_rng(0)
    sizes = 2 + rng.multinomial(60502 - 2 * 11316, np.full(11316, 1 / 11316))
    t = np.repeat(np.arange(11316), sizes)
    p = rng.integers(0, 11316, t.size)
    start = time.perf_counter()
    value = clustering.ami(t, p)
    assert time.perf_counter() - start < 2.0
    assert abs(value) < 0.01  # a random clustering


def test_f1_two_by_two_table():
    # contingency [[2, 1], [0, 2]]: TP = 1 + 0 + 1 = 2; cluster pairs 1 + 3 = 4; class pairs 3 + 1 = 4
    assert clustering.pairwise_f1([0, 0, 0, 1, 1], [0, 0, 1, 1, 1]) == pytest.approx(0.5)


def test_f1_equals_pair_enumeration():
    rng = np.random.default_rng(3)
    t, p = rng.integers(0, 4, 40), rng.integers(0, 5, 40)
    pairs = list(itertools.combinations(range(40), 2))
    same_t = np.array([t[i] == t[j] for i, j in pairs])
    same_p = np.array([p[i] == p[j] for i, j in pairs])
    tp = (same_t & same_p).sum()
    precision, recall = tp / same_p.sum(), tp / same_t.sum()
    assert clustering.pairwise_f1(t, p) == pytest.approx(2 * precision * recall / (precision + recall))


def test_kmeans_seeded_and_separable_data_is_perfect():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(8), 20)
    x = (10 * rng.normal(size=(8, 16))[y] + 0.01 * rng.normal(size=(160, 16))).astype(np.float32)
    a = clustering.kmeans(x, 8, seed=3)
    assert np.array_equal(a, clustering.kmeans(x, 8, seed=3))
    out = evaluate(x, y, metrics=["nmi", "ami", "f1"], distance="euclidean")
    assert out == pytest.approx({"nmi": 1.0, "ami": 1.0, "f1": 1.0})


def test_clustering_metrics_match_sklearn_on_the_kmeans_result(data):
    x, y = data("clustered", n=200)
    clusters = clustering.kmeans(x / np.linalg.norm(x, axis=1, keepdims=True), len(np.unique(y)), seed=0)
    out = evaluate(x, y, metrics=["nmi", "ami"], kmeans_seed=0)
    assert out["nmi"] == pytest.approx(normalized_mutual_info_score(y, clusters), abs=1e-12)
    assert out["ami"] == pytest.approx(adjusted_mutual_info_score(y, clusters), abs=1e-10)


def test_unknown_average():
    with pytest.raises(ConfigError, match="arithmetic"):
        clustering.nmi([0, 1], [0, 1], average="max")
