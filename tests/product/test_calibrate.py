"""Threshold calibration on hand-made cases whose right threshold is known."""

import numpy as np
import pytest

from deepmetric.errors import CalibrationError
from deepmetric.product import Embeddings, SearchIndex
from deepmetric.product.calibrate import calibrate

# 1-D euclidean: queries x gallery pair distances (genuine G / impostor I), ascending:
# 1 G, 2 G, 2.5 I, 4 G, 6 I, 7.5 G, 8 I, 9 I
GALLERY = SearchIndex.build(np.array([[0.0], [10.0]]), ["g0", "g1"], labels=[0, 1], metadata={"distance": "euclidean"})
QUERIES = Embeddings(np.array([[1.0], [2.0], [2.5], [4.0]]), ["q0", "q1", "q2", "q3"], np.array([0, 0, 1, 0]))


@pytest.mark.parametrize("target,threshold,precision,recall,far", [
    ({"precision": 1.0}, 2.25, 1.0, 0.5, 0.0),      # accept d <= 2: midway to the first impostor at 2.5
    ({"precision": 0.75}, 5.0, 0.75, 0.75, 0.25),   # d <= 4: 3 of 4 genuine; d <= 7.5 would be 4/6
    ({"far": 0.25}, 5.0, 0.75, 0.75, 0.25),         # one impostor of four accepted
    ({"far": 1.0}, 9.0, 0.5, 1.0, 1.0),             # everything: the last distance itself
])
def test_known_thresholds(target, threshold, precision, recall, far):
    index = SearchIndex.build(GALLERY.vectors, GALLERY.ids, GALLERY.labels, metadata={"distance": "euclidean"})
    rec = calibrate(index, QUERIES, **target, name="q.npz")
    assert rec["threshold"] == pytest.approx(threshold)
    assert (rec["precision"], rec["recall"], rec["far"]) == pytest.approx((precision, recall, far))
    assert (rec["pairs"], rec["genuine_pairs"], rec["impostor_pairs"]) == (8, 4, 4)
    assert index.metadata["threshold"] == rec["threshold"] and index.metadata["calibration"]["set"] == "q.npz"
    matches = [h.match for h in index.search(np.array([[0.0]]), 2)[0]]  # g0 at 0, g1 at 10
    assert matches == [True, threshold >= 10]


def test_within_the_set_when_the_gallery_has_no_labels():
    index = SearchIndex.build(np.zeros((1, 1)), ["g"], metadata={"distance": "euclidean"})
    labelled = Embeddings(np.array([[0.0], [1.0], [5.0], [5.5]]), list("abcd"), np.array([0, 0, 1, 1]))
    rec = calibrate(index, labelled, precision=1.0)  # pairs: 0.5 G, 1 G, 4 I, 4.5 I, 5 I, 5.5 I
    assert rec["threshold"] == pytest.approx(2.5) and rec["pairs"] == 6 and "within" in rec["pairs_from"]


def test_self_pairs_are_left_out():
    index = SearchIndex.build(np.array([[0.0], [1.0], [9.0]]), ["a", "b", "c"], labels=[0, 0, 1],
                              metadata={"distance": "euclidean"})
    same = Embeddings(index.vectors, index.ids, index.labels)
    rec = calibrate(index, same, precision=1.0)
    assert rec["pairs"] == 6 and rec["threshold"] == pytest.approx(4.5)  # 1 G (x2), 8 I, 9 I (x2 each)


def test_clear_errors():
    with pytest.raises(CalibrationError, match="exactly one target"):
        calibrate(GALLERY, QUERIES)
    with pytest.raises(CalibrationError, match="exactly one target"):
        calibrate(GALLERY, QUERIES, precision=0.9, far=0.1)
    with pytest.raises(CalibrationError, match=r"in \(0, 1\]"):
        calibrate(GALLERY, QUERIES, precision=1.5)
    with pytest.raises(CalibrationError, match="has no labels"):
        calibrate(GALLERY, Embeddings(QUERIES.vectors, QUERIES.ids), precision=0.9)
    near_impostor = Embeddings(np.array([[9.9], [1.0]]), ["x", "y"], np.array([0, 0]))  # nearest pair is an impostor
    with pytest.raises(CalibrationError, match="no threshold reaches precision 1.0: the best is 0.5"):
        calibrate(GALLERY, near_impostor, precision=1.0)
    with pytest.raises(CalibrationError, match="needs at least 1000 impostor pairs"):
        calibrate(GALLERY, QUERIES, far=1e-3)
    with pytest.raises(CalibrationError, match="no threshold keeps FAR"):
        tied = Embeddings(np.array([[9.5], [0.5], [5.0], [5.0]]), list("wxyz"), np.array([0, 1, 0, 1]))
        calibrate(GALLERY, tied, far=0.25)  # impostors at 0.5, 0.5 (one group: FAR 0.5 at once), 5, 5
    with pytest.raises(CalibrationError, match="genuine and impostor"):
        calibrate(GALLERY, Embeddings(np.array([[1.0]]), ["x"], np.array([5])), precision=0.9)
    with pytest.raises(CalibrationError, match="2 dimensions"):
        calibrate(GALLERY, Embeddings(np.zeros((2, 2)), ["x", "y"], np.array([0, 1])), precision=0.9)
