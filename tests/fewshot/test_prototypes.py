"""Few-shot classification: prototypes and kNN equal brute-force loops / scikit-learn; episode summaries."""

import math

import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier, NearestCentroid

from deepmetric.errors import InputError
from deepmetric.fewshot.episodes import EpisodeSampler
from deepmetric.fewshot.prototypes import (
    evaluate_episodes,
    knn_classify,
    loo_knn_accuracy,
    loo_prototype_accuracy,
    mean_ci95,
    nearest_prototype,
)


def _data(n=120, d=6, classes=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centres = torch.randn(classes, d, generator=g)
    return centres[labels] + 0.9 * torch.randn(n, d, generator=g), labels.numpy()


def _brute_prototype(x, episode):
    """A plain loop: class means, then the closest mean for every query."""
    preds = []
    means = [x[episode.support[episode.support_labels == c]].mean(0) for c in range(episode.n_way)]
    for q in episode.query:
        d = [float(((x[q] - m) ** 2).sum()) for m in means]
        preds.append(int(np.argmin(d)))
    return np.array(preds)


def test_prototype_evaluation_equals_brute_force_loop():
    x, labels = _data()
    episodes = list(EpisodeSampler(labels, 4, 3, query=5, episodes=7, seed=1))
    scores = evaluate_episodes(x, episodes, "prototype")
    for ep, acc in zip(episodes, scores.accuracies):
        pred = nearest_prototype(x[ep.support], torch.as_tensor(ep.support_labels), x[ep.query])
        np.testing.assert_array_equal(pred.numpy(), _brute_prototype(x, ep))
        assert acc == pytest.approx(np.mean(_brute_prototype(x, ep) == ep.query_labels))
    mean, ci = mean_ci95(scores.accuracies)
    assert scores.mean == pytest.approx(mean) and scores.ci95 == pytest.approx(ci)


def test_identity_embedding_prototypes_are_the_nearest_centroid_classifier():
    x, labels = _data(seed=3)
    support, query = x[:60], x[60:]
    ours = nearest_prototype(support, torch.as_tensor(labels[:60]), query).numpy()
    ref = NearestCentroid().fit(support.numpy(), labels[:60]).predict(query.numpy())
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("distance,metric", [("cosine", "cosine"), ("euclidean", "euclidean")])
def test_1nn_equals_sklearn(distance, metric):
    x, labels = _data(seed=5)
    support, query = x[:50], x[50:]
    ours = knn_classify(support, torch.as_tensor(labels[:50]), query, k=1, distance=distance).numpy()
    sk = KNeighborsClassifier(1, metric=metric, algorithm="brute").fit(support.numpy(), labels[:50])
    ref = sk.predict(query.numpy())
    np.testing.assert_array_equal(ours, ref)


def test_knn_vote_and_tie_goes_to_the_nearest_class():
    support = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]])
    y = torch.tensor([0, 0, 1, 1, 1])
    query = torch.tensor([[0.7, 0.3]])  # cosine order: 1 (0.9,0.1), 0, then the class-1 items
    assert knn_classify(support, y, query, k=1).tolist() == [0]
    assert knn_classify(support, y, query, k=3).tolist() == [0]  # 2 votes for 0, 1 for 1
    assert knn_classify(support, y, query, k=5).tolist() == [1]  # 3 votes for 1
    assert knn_classify(support, y, query, k=4).tolist() == [0]  # 2-2 tie: class 0 has the nearest item


def test_loo_accuracies_equal_brute_force():
    x, labels = _data(n=40, classes=4, seed=7)
    y = torch.as_tensor(labels)
    correct_nn, correct_proto = 0, 0
    xn = torch.nn.functional.normalize(x, dim=1)
    for i in range(len(x)):
        sims = xn @ xn[i]
        sims[i] = -math.inf
        correct_nn += int(labels[int(sims.argmax())] == labels[i])
        others = [j for j in range(len(x)) if j != i]
        means = [x[[j for j in others if labels[j] == c]].mean(0) for c in range(4)]
        correct_proto += int(np.argmin([float(((x[i] - m) ** 2).sum()) for m in means]) == labels[i])
    assert loo_knn_accuracy(x, y) == pytest.approx(correct_nn / len(x))
    assert loo_prototype_accuracy(x, y) == pytest.approx(correct_proto / len(x))


def test_half_precision_gives_the_same_predictions():
    x, labels = _data(seed=9)
    y = torch.as_tensor(labels[:60])
    full = nearest_prototype(x[:60], y, x[60:])
    half = nearest_prototype(x[:60].half(), y, x[60:].half())
    assert (full == half).float().mean() > 0.95


def test_mean_ci95_by_hand_and_errors():
    mean, ci = mean_ci95([0.5, 0.7, 0.9])
    assert mean == pytest.approx(0.7) and ci == pytest.approx(1.96 * 0.2 / math.sqrt(3))
    assert math.isnan(mean_ci95([0.4])[1])
    with pytest.raises(InputError):
        mean_ci95([])
    with pytest.raises(InputError, match="dimension"):
        nearest_prototype(torch.zeros(2, 3), torch.tensor([0, 1]), torch.zeros(1, 4))
    with pytest.raises(InputError, match="no support item"):
        nearest_prototype(torch.zeros(2, 3), torch.tensor([0, 2]), torch.zeros(1, 3))
