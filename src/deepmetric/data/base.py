"""The data set protocol and the class-disjoint splits used in zero-shot DML."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from deepmetric.data.images import load_rgb
from deepmetric.errors import ConfigError, DataError
from deepmetric.validation import as_int_labels


class MetricDataset:
    """Base class: items are ``(input, label)``; ``labels`` is an ``int64`` numpy array of length N.

    Subclasses set ``self.labels`` and implement ``__getitem__``. ``classes`` optionally names the
    classes (``classes[label]``); ``input_kind`` is ``"image"``, ``"tensor"`` or ``"features"`` and
    tells the trainer whether image transforms apply.
    """

    labels: np.ndarray
    input_kind: str = "tensor"
    classes: Sequence[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        raise NotImplementedError

    def picture(self, index: int) -> Image.Image:
        """Item ``index`` as an RGB picture a person can look at: its image file (``self.paths``), or what a
        data set without files (``digits``) renders."""
        paths = getattr(self, "paths", None)
        if paths is None:
            raise DataError(f"{type(self).__name__} has no image files and no way to draw its items")
        return load_rgb(paths[index])

    @property
    def num_classes(self) -> int:
        return int(np.unique(self.labels).size)

    def summary(self) -> str:
        counts = np.bincount(np.unique(self.labels, return_inverse=True)[1])
        return (
            f"{type(self).__name__}: {len(self)} items, {counts.size} classes "
            f"({counts.min()}-{counts.max()} per class)"
        )


class Subset(MetricDataset):
    """The items ``indices`` of ``dataset`` (labels kept as they are)."""

    def __init__(self, dataset: MetricDataset, indices: np.ndarray):
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = dataset.labels[self.indices]
        self.input_kind = dataset.input_kind
        self.classes = dataset.classes

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.dataset[int(self.indices[index])]

    def picture(self, index: int) -> Image.Image:
        return self.dataset.picture(int(self.indices[index]))

    def __getattr__(self, name: str) -> Any:  # e.g. `images`, `transform` of the wrapped data set
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def select_classes(dataset: MetricDataset, classes: Sequence[int]) -> Subset:
    """The items of ``dataset`` whose label is in ``classes``."""
    keep = np.isin(dataset.labels, np.asarray(classes))
    return Subset(dataset, np.flatnonzero(keep))


def split_classes(
    labels: np.ndarray, holdout: int | float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split the classes in ``labels`` into (kept, held-out) class ids, class-disjoint and seeded.

    ``holdout`` is a count (int >= 1) or a fraction in (0, 1) of the classes. This is how the trainer
    carves a validation split from the *training* classes (Musgrave et al. 2020, "A Metric Learning
    Reality Check"), so the test classes are never used to choose a checkpoint.
    """
    classes = np.unique(as_int_labels(labels))
    n = int(round(holdout * classes.size)) if isinstance(holdout, float) and holdout < 1 else int(holdout)
    if n < 2 or n > classes.size - 2:
        raise ConfigError(
            f"a class-disjoint validation split needs at least 2 held-out and 2 remaining classes; "
            f"asked to hold out {holdout!r} of {classes.size} training classes"
        )
    rng = np.random.default_rng(seed)
    held = np.sort(rng.choice(classes, size=n, replace=False))
    return np.setdiff1d(classes, held), held


def class_folds(labels: np.ndarray, folds: int, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """Split the classes in ``labels`` into (kept, held-out) class ids: fold ``fold`` of ``folds``.

    The sorted class ids are cut into ``folds`` contiguous, class-disjoint chunks of near-equal size, as the
    Reality Check's 4-fold cross-validation does (Musgrave et al. 2020; powerful-benchmarker's split
    manager): fold ``f`` is held out for validation and the model trains on the others.
    """
    classes = np.unique(as_int_labels(labels))
    if not 0 <= fold < folds:
        raise ConfigError(f"fold {fold} does not exist: there are {folds} folds, numbered from 0")
    chunks = np.array_split(classes, folds)
    smallest = min(len(c) for c in chunks)
    if smallest < 2 or classes.size - len(chunks[fold]) < 2:
        raise ConfigError(
            f"{folds} class-disjoint folds of {classes.size} training classes leave a fold with {smallest} "
            "class(es); a validation fold and the training folds need at least 2 classes each: use fewer folds"
        )
    held = chunks[fold]
    return np.setdiff1d(classes, held), held


def check_split(split: str, valid: Sequence[str], name: str) -> None:
    if split not in valid:
        raise DataError(f"data set {name!r} has no split {split!r}; valid splits: {', '.join(valid)}")
