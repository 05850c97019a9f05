"""In-memory features: an ``N x F`` array with labels, for training heads on frozen features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from deepmetric.data import register
from deepmetric.data.base import MetricDataset
from deepmetric.errors import DataError, DeepMetricError
from deepmetric.validation import as_int_labels


class FeaturesDataset(MetricDataset):
    """Rows of ``features`` with integer ``labels``; items are ``(float32 tensor [F], label)``."""

    input_kind = "features"

    def __init__(self, features, labels):
        feats = torch.as_tensor(np.asarray(features), dtype=torch.float32)
        if feats.ndim != 2:
            raise DataError(f"features must be an N x F array, got shape {tuple(feats.shape)}")
        self.labels = as_int_labels(labels)
        if len(self.labels) != feats.shape[0]:
            raise DataError(f"{feats.shape[0]} feature rows but {len(self.labels)} labels")
        if not bool(torch.isfinite(feats).all()):
            raise DataError("features contain NaN or Inf")
        self.features = feats

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.features[index], int(self.labels[index])


@register("features")
def load_features(root: str | None = None, split: str = "train") -> FeaturesDataset:
    """Load ``{split}_features`` / ``{split}_labels`` arrays from the ``.npz`` file ``root``.

    Example: ``np.savez("feats.npz", train_features=Xtr, train_labels=ytr, test_features=Xte,
    test_labels=yte)`` then ``data.build("features", root="feats.npz", split="test")``.
    """
    if root is None:
        raise DataError("data set 'features' needs root=<file.npz> holding <split>_features and <split>_labels")
    path = Path(root)
    if not path.is_file():
        raise DataError(f"features file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            fk, lk = f"{split}_features", f"{split}_labels"
            if fk not in keys or lk not in keys:
                raise DataError(
                    f"{path} has no arrays {fk!r} and {lk!r} for split {split!r}; it holds: {', '.join(sorted(keys))}"
                )
            return FeaturesDataset(npz[fk], npz[lk])
    except (ValueError, OSError) as exc:
        if isinstance(exc, DeepMetricError):
            raise
        raise DataError(f"cannot read {path} as a .npz file: {exc}") from exc
