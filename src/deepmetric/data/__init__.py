"""Data sets. Protocol: ``dataset[i] -> (input, label)``, ``len(dataset)``, and an integer ``labels`` array.

``build(name, root=None, split="train")`` constructs a registered data set; splits are ``"train"`` and
``"test"`` (plus ``"query"`` / ``"gallery"`` where a data set has them). ``available()`` lists the keys.
"""

from __future__ import annotations

from typing import Any

from deepmetric.data.base import MetricDataset, Subset, split_classes
from deepmetric.registry import Registry

DATASETS: Registry[MetricDataset] = Registry("data set")
register = DATASETS.register


def build(name: str, root: str | None = None, split: str = "train", **kwargs: Any) -> MetricDataset:
    """Construct the data set registered as ``name`` for ``split``."""
    return DATASETS.build(name, root=root, split=split, **kwargs)


def available() -> list[str]:
    """Registry keys of all data sets."""
    return DATASETS.available()


from deepmetric.data import benchmarks, digits, features, folder, oodml  # noqa: E402,F401  (register data sets)

__all__ = ["MetricDataset", "Subset", "split_classes", "build", "available", "register", "DATASETS"]
