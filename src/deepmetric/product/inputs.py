"""How pictures become a model's input, as a JSON-able spec that travels with embeddings, indexes and exports.

Three kinds, read from the run's data set:

- ``{"kind": "dataset", "data": "digits"}``: the data set class draws its own inputs from pictures
  (``from_pictures``; digits: greyscale, 8x8, sixteenths of ink);
- ``{"kind": "image", "pipeline", "size", "normalization"}``: the data set's test transform
  (:func:`deepmetric.data.transforms.build_transform` with ``train=False``);
- ``{"kind": "features"}``: the model takes feature vectors; pictures cannot be embedded.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from deepmetric import data
from deepmetric.data.transforms import build_transform, normalization_for
from deepmetric.errors import InputError
from deepmetric.training.config import RunConfig


def input_spec(cfg: RunConfig) -> dict[str, Any]:
    """The spec of the run's inputs: its data set's ``from_pictures``, or its test image transform."""
    cls = data.DATASETS.get(cfg.data.name)
    if hasattr(cls, "from_pictures"):
        return {"kind": "dataset", "data": cfg.data.name}
    if getattr(cls, "input_kind", "tensor") != "image":
        return {"kind": "features", "data": cfg.data.name}
    defaults = {k: p.default for k, p in inspect.signature(cls).parameters.items()}
    kw = {**defaults, **cfg.data.kwargs}
    return {"kind": "image", "pipeline": kw.get("pipeline") or "default", "size": kw.get("image_size"),
            "normalization": cfg.data.kwargs.get("normalization", normalization_for(cfg.model.backbone))}


def image_transform(spec: dict[str, Any]):
    """The test transform of an ``image`` spec (PIL RGB image -> normalised tensor)."""
    return build_transform(False, pipeline=spec["pipeline"], normalization=spec["normalization"], size=spec["size"])


def picture_transform(spec: dict[str, Any]):
    """One picture -> one model input, for a data set of image files (``transform=``); None for features."""
    if spec["kind"] == "image":
        return image_transform(spec)
    if spec["kind"] == "dataset":
        return functools.partial(_one_picture, spec)
    return None


def _one_picture(spec: dict[str, Any], picture: Image.Image) -> torch.Tensor:
    return pictures_to_inputs(spec, [picture])[0]


def pictures_to_inputs(spec: dict[str, Any], pictures: Sequence[Image.Image]) -> torch.Tensor:
    """A batch of model inputs from pictures of any mode and size, as the run's data set would make them."""
    if not pictures:
        raise InputError("no images given: pass at least one picture")
    bad = [type(p).__name__ for p in pictures if not isinstance(p, Image.Image)]
    if bad:
        raise InputError(f"expected PIL images, got {', '.join(sorted(set(bad)))}")
    if spec["kind"] == "dataset":
        return data.DATASETS.get(spec["data"]).from_pictures(pictures)
    if spec["kind"] == "image":
        transform = image_transform(spec)
        return torch.stack([transform(p.convert("RGB")) for p in pictures])
    raise InputError(f"the model was trained on feature vectors ({spec.get('data')!r}), not pictures: embed a "
                     "data set or search with --embedding FILE instead of --image")
