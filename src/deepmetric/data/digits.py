"""The embedded ``digits`` data set: scikit-learn's 1,797 8x8 handwritten digits (UCI, Alpaydin & Kaynak 1998).

Zero-shot split as in DML benchmarks: ``train`` holds classes 0-4, ``test`` the unseen classes 5-9
(``all`` holds everything). ``augment`` (default: on for ``train``) shifts each image by up to one
pixel in each direction. Inputs are ``[1, 8, 8]`` float tensors scaled to [0, 1]; no download.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from deepmetric.data import register
from deepmetric.data.base import MetricDataset, check_split

SPLITS = {"train": range(0, 5), "test": range(5, 10), "all": range(0, 10)}


@register("digits")
class Digits(MetricDataset):
    """scikit-learn's 1,797 8x8 digits, embedded: train = classes 0-4, test = unseen classes 5-9."""

    input_kind = "tensor"

    def __init__(self, root: str | None = None, split: str = "train", augment: bool | None = None):
        from sklearn.datasets import load_digits

        check_split(split, list(SPLITS), "digits")
        bunch = load_digits()
        keep = np.isin(bunch.target, list(SPLITS[split]))
        self.split = split
        self.images = torch.from_numpy(bunch.images[keep].astype(np.float32) / 16.0).unsqueeze(1)
        self.labels = bunch.target[keep].astype(np.int64)
        self.classes = [str(c) for c in range(10)]
        self.augment = split == "train" if augment is None else augment

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.augment:  # shift by up to one pixel in each direction (zero fill), drawn from torch's RNG
            dy, dx = torch.randint(0, 3, (2,)).tolist()
            image = nn.functional.pad(image, (1, 1, 1, 1))[:, dy : dy + 8, dx : dx + 8]
        return image, int(self.labels[index])

    def raw_features(self) -> torch.Tensor:
        """Flattened pixels ``[N, 64]``: the 'raw pixels' baseline of the demo."""
        return self.images.flatten(1)
