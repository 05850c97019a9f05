"""Retrieval metrics: the hand cases of the spec and invariances (hypothesis)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepmetric.evaluation import evaluate, retrieval

REL = torch.tensor([[False, True, True, False]])
R = torch.tensor([2])


def test_hand_case_ranking():
    assert retrieval.recall_at_k(REL, 1).item() == 0.0
    assert retrieval.recall_at_k(REL, 2).item() == 1.0
    assert retrieval.precision_at_k(REL, 4).item() == 0.5
    assert retrieval.r_precision(REL, R).item() == 0.5
    assert retrieval.map_at_r(REL, R).item() == pytest.approx((0 + 1 / 2) / 2)
    want = (1 / math.log2(3) + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert retrieval.ndcg_at_k(REL, R, 4).item() == pytest.approx(want)


def test_hand_case_full_ap():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6]])  # ranking rel = [0, 1, 1, 0]
    pairs = torch.tensor([0, 0]), torch.tensor([1, 2])
    assert retrieval.average_precision(scores, pairs, R, 1000).item() == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_hand_case_through_evaluate():
    """Query at angle 0, gallery at 10..40 degrees labelled [0, 1, 1, 0] relative to the query."""
    angles = np.radians([10, 20, 30, 40])
    gallery = np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)
    out = evaluate(gallery, [5, 7, 7, 5], query_embeddings=np.array([[1.0, 0.0]], np.float32), query_labels=[7], ks=(1, 2, 4))
    assert out["recall@1"] == 0 and out["recall@2"] == 1 and out["r_precision"] == 0.5
    assert out["map@r"] == pytest.approx(0.25) and out["map"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert out["ndcg@4"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / (1 + 1 / math.log2(3)))


def test_ap_ties_rank_by_index():
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.1]])
    pairs = torch.tensor([0]), torch.tensor([1])  # the relevant item ties with index 0 and 2
    assert retrieval.average_precision(scores, pairs, torch.tensor([1]), 1000).item() == pytest.approx(1 / 2)


def _data(seed, n, d, n_classes):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, n_classes, n)


SETTINGS = settings(max_examples=15, deadline=None)
SHAPES = dict(seed=st.integers(0, 2**16), n=st.integers(6, 40), d=st.integers(2, 6), n_classes=st.integers(1, 5))
METRICS = ["recall@k", "precision@k", "ndcg@k", "r_precision", "map@r", "map"]


@SETTINGS
@given(**SHAPES)
def test_permuting_items_changes_nothing(seed, n, d, n_classes):
    x, y = _data(seed, n, d, n_classes)
    perm = np.random.default_rng(seed + 1).permutation(n)
    a = evaluate(x, y, metrics=METRICS, ks=(1, 3))
    b = evaluate(x[perm], y[perm], metrics=METRICS, ks=(1, 3))
    assert a == pytest.approx(b, nan_ok=True)


@SETTINGS
@given(**SHAPES, scale=st.lists(st.floats(0.01, 100), min_size=40, max_size=40))
def test_scaling_leaves_cosine_metrics_unchanged(seed, n, d, n_classes, scale):
    x, y = _data(seed, n, d, n_classes)
    scaled = x * np.asarray(scale[:n], np.float32)[:, None]
    assert evaluate(x, y, metrics=METRICS, ks=(1, 3)) == pytest.approx(evaluate(scaled, y, metrics=METRICS, ks=(1, 3)), nan_ok=True)


@SETTINGS
@given(**SHAPES)
def test_exact_duplicate_of_each_query_gives_recall_at_1(seed, n, d, n_classes):
    x, y = _data(seed, n, d, n_classes)
    gallery, labels = np.concatenate([x, _data(seed + 1, n, d, n_classes)[0]]), np.concatenate([y, y])
    out = evaluate(gallery, labels, query_embeddings=x, query_labels=y, metrics=["recall@1"], backend="torch")
    assert out["recall@1"] == 1.0
