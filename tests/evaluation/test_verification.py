"""Verification metrics against sklearn and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from deepmetric.errors import InputError
from deepmetric.evaluation import verification as v


@pytest.fixture
def pairs():
    rng = np.random.default_rng(0)
    same = rng.integers(0, 2, 2000)
    scores = np.round(rng.normal(same * 1.0, 1.0), 1)  # rounding makes many ties
    return scores, same


def test_roc_auc_and_ap_equal_sklearn(pairs):
    scores, same = pairs
    assert v.roc_auc(scores, same) == pytest.approx(roc_auc_score(same, scores), abs=1e-12)
    assert v.pair_average_precision(scores, same) == pytest.approx(average_precision_score(same, scores), abs=1e-12)


def test_roc_curve_equals_sklearn(pairs):
    scores, same = pairs
    fpr, tpr, thr = v.roc_curve(scores, same)
    want = roc_curve(same, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, want[0])
    np.testing.assert_allclose(tpr, want[1])
    np.testing.assert_array_equal(thr[1:], want[2][1:])


def test_best_threshold_accuracy_brute_force(pairs):
    scores, same = pairs
    acc, threshold = v.best_threshold_accuracy(scores, same)
    brute = max(((scores >= t) == same).mean() for t in np.r_[np.unique(scores), np.inf])
    assert acc == pytest.approx(brute)
    assert ((scores >= threshold) == same).mean() == pytest.approx(acc)


def test_hand_case():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    same = np.array([1, 0, 1, 0, 0])
    assert v.roc_auc(scores, same) == pytest.approx(5 / 6)  # 5 of 6 genuine/impostor orderings right
    assert v.best_threshold_accuracy(scores, same) == (pytest.approx(0.8), 0.9)
    # ROC points (fpr, tpr): (0,0) (0,.5) (1/3,.5) (1/3,1) ...: at FAR 1/3 the higher TAR counts
    assert v.tar_at_far(scores, same, 1 / 3) == pytest.approx(1.0)
    # a genuine and an impostor pair tied at 0.7 make one diagonal ROC step (1/6,.5) -> (1/3,1)
    tied = np.array([0.9, 0.8, 0.7, 0.7, 0.5, 0.4, 0.3, 0.2]), np.array([1, 0, 1, 0, 0, 0, 0, 0])
    assert v.tar_at_far(*tied, 0.25) == pytest.approx(0.75)
    with pytest.warns(RuntimeWarning, match="impostor"):
        assert np.isnan(v.tar_at_far(scores, same, 1e-4))


def test_tar_at_far_is_genuine_fraction_above_impostor_quantile():
    rng = np.random.default_rng(1)
    genuine, impostor = rng.normal(2, 1, 3000), rng.normal(0, 1, 100000)
    scores, same = np.r_[genuine, impostor], np.r_[np.ones(3000), np.zeros(100000)]
    t = np.quantile(impostor, 1 - 1e-3)
    assert v.tar_at_far(scores, same, 1e-3) == pytest.approx((genuine >= t).mean(), abs=1e-3)


def test_kfold_and_metrics_dict():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(600, 16)).astype(np.float32)
    same = np.arange(600) % 2
    b = np.where(same[:, None] == 1, a + 0.5 * rng.normal(size=a.shape), rng.normal(size=a.shape)).astype(np.float32)
    out = v.verification_metrics(a, b, same, fars=(1e-2,))
    assert set(out) == {"roc_auc", "accuracy", "threshold", "kfold_accuracy", "kfold_accuracy_std", "auprc", "tar@far=0.01"}
    assert 0.9 < out["kfold_accuracy"] <= out["accuracy"] + 0.05 and out["roc_auc"] > 0.95


@pytest.mark.parametrize(
    ("scores", "same", "match"),
    [([0.1, 0.2], [1, 1], "both"), ([0.1, np.nan], [1, 0], "NaN"), ([0.1, 0.2], [1, 2], "binary"), ([0.1], [1, 0], "equal")],
)
def test_bad_pairs(scores, same, match):
    with pytest.raises(InputError, match=match):
        v.roc_auc(scores, same)
