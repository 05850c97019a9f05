"""n-way k-shot episodes over the classes of any labelled data set.

An :class:`Episode` holds indices into the data set: ``k`` support items for each of its ``n`` classes
(class-major: ``n`` blocks of ``k``) and the query items of the same classes, disjoint from the support.
Labels inside an episode are local, ``0..n-1`` in the order of ``episode.classes``.

:class:`EpisodeSampler` draws episode ``i`` from its own generator seeded with ``(seed, i)``, so an
episode does not depend on how many were drawn before it (re-running one k or n reproduces it).
:func:`episode_from_support` builds an episode from a given support set, with the rest of each class as
queries (the ``test_episodes`` of the ooDML split files).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from deepmetric.errors import ConfigError, DataError
from deepmetric.validation import as_int_labels


@dataclass(frozen=True)
class Episode:
    """Indices (into the data set) and local labels (``0..n-1`` in the order of ``classes``)."""

    classes: np.ndarray
    support: np.ndarray
    support_labels: np.ndarray
    query: np.ndarray
    query_labels: np.ndarray

    @property
    def n_way(self) -> int:
        return len(self.classes)


def _local(labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Original labels -> position in ``classes``."""
    order = np.argsort(classes)
    return order[np.searchsorted(classes[order], labels)]


def episode_from_support(labels, support: Sequence[int] | np.ndarray, query_per_class: int | None = None,
                         seed: int = 0) -> Episode:
    """The episode with the given ``support`` indices; the queries are the other items of the support's
    classes (all of them, or ``query_per_class`` drawn with ``seed``)."""
    labels = as_int_labels(labels)
    support = np.asarray(support, dtype=np.int64)
    if support.size == 0:
        raise DataError("an episode needs at least one support item")
    if len(np.unique(support)) != support.size:
        raise DataError("the support set lists an item twice")
    classes = np.unique(labels[support])
    rest = np.setdiff1d(np.flatnonzero(np.isin(labels, classes)), support)
    if query_per_class is not None:
        rng = np.random.default_rng(seed)
        rest = np.sort(np.concatenate([rng.permutation(rest[labels[rest] == c])[:query_per_class] for c in classes]))
    order = np.argsort(_local(labels[support], classes), kind="stable")
    support = support[order]
    return Episode(classes, support, _local(labels[support], classes), rest, _local(labels[rest], classes))


class EpisodeSampler:
    """``episodes`` seeded n-way k-shot episodes over ``classes`` (default: every class in ``labels``).

    Each episode draws ``n_way`` distinct classes among those with at least ``k_shot + 1`` items (``k_shot
    + query`` when ``query`` is set), then per class ``k_shot`` support items and ``query`` query items
    (``None``: all the remaining items of the class) without overlap.
    """

    def __init__(self, labels, n_way: int, k_shot: int, query: int | None = None, episodes: int = 10,
                 seed: int = 0, classes: Sequence[int] | None = None):
        self.labels = as_int_labels(labels)
        for name, value, low in (("n_way", n_way, 2), ("k_shot", k_shot, 1), ("episodes", episodes, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        if query is not None and (isinstance(query, bool) or query < 1):
            raise ConfigError(f"query must be a positive number of items per class or None (all the rest), "
                              f"got {query!r}")
        self.n_way, self.k_shot, self.episodes = int(n_way), int(k_shot), int(episodes)
        self.query, self.seed = query, seed
        order = np.argsort(self.labels, kind="stable")  # items grouped by class: one sort, no loop over classes
        present, first, sizes = np.unique(self.labels[order], return_index=True, return_counts=True)
        pool = present if classes is None else np.unique(np.asarray(classes, dtype=np.int64))
        where = np.searchsorted(present, pool).clip(max=max(len(present) - 1, 0))
        counts = np.where(present[where] == pool, sizes[where], 0) if len(present) else np.zeros(len(pool), int)
        need = self.k_shot + (query or 1)
        self.classes = pool[counts >= need]
        if len(self.classes) < self.n_way:
            raise DataError(
                f"{self.n_way}-way {self.k_shot}-shot episodes need {self.n_way} classes with at least {need} items "
                f"(support + query); only {len(self.classes)} of the {len(pool)} classes have that many "
                f"(smallest class: {counts.min() if counts.size else 0} items). Lower n_way, k_shot or query."
            )
        block = np.searchsorted(present, self.classes)
        self._members = {int(c): order[first[b] : first[b] + sizes[b]] for c, b in zip(self.classes, block)}

    def __len__(self) -> int:
        return self.episodes

    def __getitem__(self, i: int) -> Episode:
        if not 0 <= i < self.episodes:
            raise IndexError(f"episode {i} out of range (there are {self.episodes})")
        rng = np.random.default_rng([self.seed, i])
        classes = np.sort(rng.choice(self.classes, size=self.n_way, replace=False))
        support, query = [], []
        for c in classes:  # n_way classes, a few at most: the items themselves are drawn vectorised
            members = rng.permutation(self._members[int(c)])
            support.append(members[: self.k_shot])
            query.append(members[self.k_shot : None if self.query is None else self.k_shot + self.query])
        support_idx, query_idx = np.concatenate(support), np.concatenate(query)
        return Episode(classes, support_idx, _local(self.labels[support_idx], classes),
                       query_idx, _local(self.labels[query_idx], classes))

    def __iter__(self) -> Iterator[Episode]:
        return (self[i] for i in range(self.episodes))


def episodes_from_published(labels, class_names: Sequence[str], paths: Sequence[str],
                            episodes: Mapping[object, Mapping[str, Sequence[str]]]) -> list[Episode]:
    """Episodes given as ``{episode: {class name: [support file names]}}`` (ooDML's ``test_episodes[shots]``).

    ``paths[i]`` is the file of item ``i`` and ``class_names[labels[i]]`` its class; a support file is
    matched by its name within its class (the split files store bare file names).
    """
    labels = as_int_labels(labels)
    names = np.asarray([str(class_names[y]) for y in labels])
    files = np.asarray([str(p).replace("\\", "/").rsplit("/", 1)[-1] for p in paths])
    key = {(n, f): i for i, (n, f) in enumerate(zip(names, files))}
    out = []
    for ep, by_class in episodes.items():
        support = []
        for cls, items in by_class.items():
            for item in items:
                idx = key.get((str(cls), str(item).replace("\\", "/").rsplit("/", 1)[-1]))
                if idx is None:
                    raise DataError(f"episode {ep}: support image {item!r} of class {cls!r} is not in the data set")
                support.append(idx)
        out.append(episode_from_support(labels, support))
    return out
