"""Few-shot classification with an embedding: nearest prototype and k-nearest neighbours, over episodes.

* :func:`nearest_prototype`: class prototypes are the mean support embeddings, ``p_c = (1/k) Σ f(x_i)``; a
  query takes the class of the closest prototype under squared Euclidean distance (Snell et al. 2017).
* :func:`knn_classify`: majority vote of the ``k`` nearest support items (cosine by default, as the
  histogram-loss embeddings of Scott et al. 2018 are used with 1-NN); a tie goes to the tied class whose
  nearest member ranks first.
* :func:`evaluate_episodes`: accuracy per episode (all queries of an episode in one distance matrix),
  summarised as mean ± 95% confidence half-width ``1.96 · s / √E`` over the ``E`` episodes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from deepmetric.distances import as_compute_dtype, build as build_distance
from deepmetric.errors import ConfigError, InputError
from deepmetric.evaluation.knn import knn
from deepmetric.fewshot.episodes import Episode
from deepmetric.validation import check_embeddings, check_labels

Classifier = Literal["prototype", "knn"]


def _checked(support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    check_embeddings(support, "support embeddings")
    check_labels(support_labels, support.shape[0], "support labels")
    check_embeddings(query, "query embeddings")
    if support.shape[1] != query.shape[1]:
        raise InputError(f"support embeddings have dimension {support.shape[1]} but queries have {query.shape[1]}")
    if support_labels.numel() and int(support_labels.min()) < 0:
        raise InputError("support labels must be local class ids 0..n-1")
    return support_labels.to(support.device).long()


def prototypes(support: torch.Tensor, support_labels: torch.Tensor, n_classes: int | None = None) -> torch.Tensor:
    """Mean support embedding of each class ``0..n-1``, ``[n, D]`` (float32 for half-precision inputs)."""
    x = as_compute_dtype(support)
    y = support_labels.to(x.device).long()
    n = int(y.max()) + 1 if n_classes is None else n_classes
    sums = x.new_zeros(n, x.shape[1]).index_add(0, y, x)
    counts = torch.bincount(y, minlength=n)
    if bool((counts == 0).any()):
        raise InputError(f"classes {torch.nonzero(counts == 0).flatten().tolist()} have no support item")
    return sums / counts[:, None].to(x.dtype)


def nearest_prototype(support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor,
                      distance: str = "squared_euclidean") -> torch.Tensor:
    """Local label of the nearest class prototype for every query, ``[Q]``."""
    y = _checked(support, support_labels, query)
    d = build_distance(distance).dissimilarity(query, prototypes(support, y))
    return d.argmin(dim=1)


def knn_classify(support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, k: int = 1,
                 distance: str = "cosine") -> torch.Tensor:
    """Majority label of the ``k`` nearest support items for every query, ``[Q]`` (ties: nearest first)."""
    y = _checked(support, support_labels, query)
    n_classes = int(y.max()) + 1
    idx = knn(query, support, k, distance=distance, backend="torch").indices  # [Q, k], nearest first
    votes = y[idx]
    # score = count·(k+1) − rank of the class's first neighbour: the count decides, the nearest member breaks ties
    count = torch.zeros(query.shape[0], n_classes, dtype=torch.long, device=y.device)
    count.scatter_add_(1, votes, torch.ones_like(votes))
    ranks = torch.arange(votes.shape[1], device=y.device).expand_as(votes)
    first = torch.full_like(count, votes.shape[1]).scatter_reduce_(1, votes, ranks, reduce="amin")
    return (count * (votes.shape[1] + 1) - first).argmax(dim=1)


def classify(support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor,
             classifier: Classifier = "prototype", k: int = 1, distance: str | None = None) -> torch.Tensor:
    """:func:`nearest_prototype` (default distance squared Euclidean) or :func:`knn_classify` (cosine)."""
    if classifier == "prototype":
        return nearest_prototype(support, support_labels, query, distance or "squared_euclidean")
    if classifier == "knn":
        return knn_classify(support, support_labels, query, k, distance or "cosine")
    raise ConfigError(f"classifier must be 'prototype' or 'knn', got {classifier!r}")


def mean_ci95(values: Iterable[float]) -> tuple[float, float]:
    """``(mean, 1.96 · s / √n)`` with ``s`` the sample standard deviation; the half-width is NaN for n = 1."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        raise InputError("no values to summarise")
    half = 1.96 * v.std(ddof=1) / np.sqrt(v.size) if v.size > 1 else float("nan")
    return float(v.mean()), float(half)


@dataclass
class EpisodeScores:
    """Accuracy of every episode, and their mean ± 95% confidence half-width."""

    accuracies: np.ndarray

    @property
    def mean(self) -> float:
        return mean_ci95(self.accuracies)[0]

    @property
    def ci95(self) -> float:
        return mean_ci95(self.accuracies)[1]


def episode_accuracy(embeddings: torch.Tensor, episode: Episode, classifier: Classifier = "prototype", k: int = 1,
                     distance: str | None = None) -> float:
    """Accuracy on the queries of ``episode``; ``embeddings`` are indexed by the episode's data-set indices."""
    dev = embeddings.device
    support = embeddings[torch.as_tensor(episode.support, device=dev)]
    query = embeddings[torch.as_tensor(episode.query, device=dev)]
    pred = classify(support, torch.as_tensor(episode.support_labels, device=dev), query, classifier, k, distance)
    return float((pred == torch.as_tensor(episode.query_labels, device=dev)).double().mean())


def evaluate_episodes(embeddings: torch.Tensor, episodes: Iterable[Episode], classifier: Classifier = "prototype",
                      k: int = 1, distance: str | None = None) -> EpisodeScores:
    """Few-shot accuracy of fixed ``embeddings [N, D]`` (rows = data-set items) over ``episodes``."""
    check_embeddings(embeddings)
    with torch.no_grad():
        accs = [episode_accuracy(embeddings, ep, classifier, k, distance) for ep in episodes]
    if not accs:
        raise InputError("no episodes to evaluate")
    return EpisodeScores(np.asarray(accs))


def loo_knn_accuracy(embeddings: torch.Tensor, labels: torch.Tensor, distance: str = "cosine") -> float:
    """Leave-one-out 1-NN accuracy (= R@1) of a labelled set, each item excluded by index: the training
    accuracy of adapted DML embeddings in Scott et al. (2018)."""
    check_embeddings(embeddings)
    y = check_labels(labels, embeddings.shape[0]).to(embeddings.device)
    nearest = knn(embeddings, None, 1, distance=distance, backend="torch").indices[:, 0]
    return float((y[nearest] == y).double().mean())


def loo_prototype_accuracy(embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    """Leave-one-out nearest-prototype accuracy: each item against the prototypes of the other classes
    and the mean of the *other* items of its own class (squared Euclidean); items alone in their class
    count as errors. The training accuracy of adapted prototypical networks here."""
    check_embeddings(embeddings)
    y = check_labels(labels, embeddings.shape[0]).to(embeddings.device).long()
    x = as_compute_dtype(embeddings)
    n = int(y.max()) + 1
    counts = torch.bincount(y, minlength=n).to(x.dtype)
    sums = x.new_zeros(n, x.shape[1]).index_add(0, y, x)
    d = build_distance("squared_euclidean")(x, sums / counts.clamp(min=1)[:, None])
    own = (sums[y] - x) / (counts[y] - 1).clamp(min=1)[:, None]
    d_own = ((x - own) ** 2).sum(1)
    d = d.scatter(1, y[:, None], torch.where(counts[y] > 1, d_own, torch.full_like(d_own, math.inf))[:, None])
    d[:, counts == 0] = math.inf
    return float((d.argmin(1) == y).double().mean())
