"""Models: backbones (registry) and the embedding head.

``build(name, pretrained=False, pretrained_path=None, **kwargs)`` returns a backbone: an ``nn.Module``
mapping inputs to features ``[B, F]`` with attribute ``num_features``. Names are looked up in this
order: deepmetric's own registry (``small_cnn``, ``bninception``), timm, torchvision; force one with a ``timm:`` or
``torchvision:`` prefix. ``available()`` lists the registered names (timm and torchvision names come on top).
Embedding heads (``linear``, ``multi_head``) are in the registry ``HEADS`` (``deepmetric.models.head``).
"""

from __future__ import annotations

from deepmetric.models.backbones import BACKBONES, build, available
from deepmetric.models import bninception  # noqa: F401 - registers `bninception`
from deepmetric.models.head import HEADS, EmbeddingHead, EmbeddingModel
from deepmetric.models import multihead  # noqa: F401,E402 - registers the `multi_head` head

__all__ = ["BACKBONES", "HEADS", "build", "available", "EmbeddingHead", "EmbeddingModel"]
