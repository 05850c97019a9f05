"""Image transforms: the standard DML train augmentation and test transform (torchvision)."""

from __future__ import annotations

from collections.abc import Sequence

from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_transform(
    train: bool,
    size: int = 224,
    resize: int = 256,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    scale: tuple[float, float] = (0.08, 1.0),
) -> T.Compose:
    """Train: random resized crop ``size`` + horizontal flip; test: resize ``resize`` + centre crop ``size``."""
    if train:
        ops = [T.RandomResizedCrop(size, scale=scale), T.RandomHorizontalFlip()]
    else:
        ops = [T.Resize(resize), T.CenterCrop(size)]
    return T.Compose([*ops, T.ToTensor(), T.Normalize(mean, std)])
