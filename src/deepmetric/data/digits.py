"""The embedded ``digits`` data set: scikit-learn's 1,797 8x8 handwritten digits (UCI, Alpaydin & Kaynak 1998).

Zero-shot split as in DML benchmarks: ``train`` holds classes 0-4, ``test`` the unseen classes 5-9
(``all`` holds everything). ``augment`` (default: on for ``train``) shifts each image by up to one
pixel in each direction. Inputs are ``[1, 8, 8]`` float tensors scaled to [0, 1]; no download.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
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

    def picture(self, index: int, scale: int = 16) -> Image.Image:
        """Item ``index`` drawn as dark ink on white, ``8 * scale`` pixels square (nearest-neighbour upscaling)."""
        ink = self.images[index, 0].numpy()
        grey = Image.fromarray(np.round(255 * (1 - ink)).astype(np.uint8), mode="L")
        return grey.resize((8 * scale, 8 * scale), Image.NEAREST).convert("RGB")

    @staticmethod
    def from_pictures(pictures: Sequence[Image.Image]) -> torch.Tensor:
        """Pictures of any mode and size as model inputs ``[n, 1, 8, 8]``, as scikit-learn made its digits
        (32x32 bitmaps counted in 4x4 blocks, 0-16): greyscale, ink = the side away from the background (the
        median of the border, so dark-on-light and light-on-dark both work), padded to a square with
        background, averaged down to 8x8 and rounded to sixteenths. Inverts :meth:`picture` exactly."""
        out = torch.empty(len(pictures), 1, 8, 8)
        for i, picture in enumerate(pictures):  # one PIL resize per picture: sizes differ
            grey = np.asarray(picture.convert("L"), dtype=np.float32) / 255
            border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
            ink = 1 - grey if np.median(border) > 0.5 else grey
            side = max(ink.shape)
            square = np.zeros((side, side), np.float32)
            top, left = (side - ink.shape[0]) // 2, (side - ink.shape[1]) // 2
            square[top : top + ink.shape[0], left : left + ink.shape[1]] = ink
            small = np.asarray(Image.fromarray(square, mode="F").resize((8, 8), Image.BOX))
            out[i, 0] = torch.from_numpy(np.round(np.clip(small, 0, 1) * 16) / 16)
        return out

    def raw_features(self) -> torch.Tensor:
        """Flattened pixels ``[N, 64]``: the 'raw pixels' baseline of the demo."""
        return self.images.flatten(1)
