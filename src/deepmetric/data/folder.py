"""A generic image folder: ``root/<class name>/<image>``, one sub-folder per class.

Splits: if ``root/train`` and ``root/test`` (or ``query``/``gallery``) exist, ``split`` picks that
sub-folder. Otherwise the sorted class folders are split zero-shot style: the first half is ``train``,
the second half ``test``; ``all`` takes every class.

Bad content is **skipped with a warning** that lists it (nothing else is lost): class folders without a
readable image, and files that are not readable images (checked on load with PIL, header only;
``verify=False`` skips the check for very large folders).

``augment`` (default: ``split == "train"``) picks the train augmentation or the test transform of
``pipeline`` (see ``data.transforms.PIPELINES``); the trainer passes ``augment=False`` for a validation split
carved from the training classes, and the ``normalization`` its backbone expects (``imagenet``, or
``bninception``: BGR, 0-255, mean-subtracted).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from deepmetric.data import register
from deepmetric.data.base import MetricDataset
from deepmetric.data.images import IMAGE_EXTENSIONS, is_readable, load_rgb
from deepmetric.data.transforms import build_transform
from deepmetric.errors import DataError

NAMED_SPLITS = ("train", "test", "query", "gallery")


def _listing(items: list[str], limit: int = 10) -> str:
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


@register("folder")
class ImageFolder(MetricDataset):
    """Images in ``root/<class>/``; train/test sub-folders if present, else the classes split in halves."""

    input_kind = "image"

    def __init__(
        self,
        root: str | None = None,
        split: str = "train",
        transform: Any = None,
        augment: bool | None = None,
        verify: bool = True,
        image_size: int = 224,
        pipeline: str = "default",
        normalization: str = "imagenet",
    ):
        if root is None:
            raise DataError("data set 'folder' needs root=<folder with one sub-folder per class>")
        base = Path(root)
        if not base.is_dir():
            raise DataError(f"image folder not found: {base}")
        if (base / split).is_dir():
            class_dirs = sorted(p for p in (base / split).iterdir() if p.is_dir())
        else:
            class_dirs = sorted(p for p in base.iterdir() if p.is_dir() and p.name not in NAMED_SPLITS)
            half = (len(class_dirs) + 1) // 2
            by_split = {"train": class_dirs[:half], "test": class_dirs[half:], "all": class_dirs}
            if split not in by_split:
                raise DataError(
                    f"{base} has no '{split}' sub-folder; without one the valid splits are train, test, all"
                )
            class_dirs = by_split[split]
        if not class_dirs:
            raise DataError(f"no class sub-folders in {base} for split {split!r}")

        paths, labels, names, empty, unreadable = [], [], [], [], []
        for class_dir in class_dirs:
            files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            if verify:
                bad = [p for p in files if not is_readable(p)]
                unreadable += [str(p) for p in bad]
                files = [p for p in files if p not in set(bad)]
            if not files:
                empty.append(class_dir.name)
                continue
            label = len(names)
            names.append(class_dir.name)
            paths += files
            labels += [label] * len(files)
        if unreadable:
            warnings.warn(f"skipped {len(unreadable)} unreadable image(s): {_listing(unreadable)}", stacklevel=2)
        if empty:
            warnings.warn(f"skipped {len(empty)} class folder(s) without images: {_listing(empty)}", stacklevel=2)
        if not paths:
            raise DataError(f"no readable images under {base} for split {split!r}")

        self.root, self.split = base, split
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = names
        augment = split == "train" if augment is None else augment
        self.transform = (transform if transform is not None
                          else build_transform(augment, pipeline=pipeline, normalization=normalization, size=image_size))

    def __getitem__(self, index: int):
        img = load_rgb(self.paths[index])
        return self.transform(img), int(self.labels[index])
