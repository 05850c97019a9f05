"""Embedding-space augmentation: extra (synthetic) embeddings and labels made inside the training step.

Contract: an augmenter is an ``nn.Module`` called by the trainer between the embedding head and the
miner/loss as ``augmenter(embeddings[B, D], labels[B]) -> (embeddings'[N, D], labels'[N], is_synthetic[N])``,
with the real rows first and unchanged (``embeddings'[:B] == embeddings``). Whatever state it keeps across
steps (memory banks, per-class statistics) lives in buffers, so it is saved in checkpoints and restored on
resume. With ``augment.name: null`` (the default) there is no augmenter and the step is unchanged.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from deepmetric.registry import Registry

AUGMENTERS: Registry[nn.Module] = Registry("augmenter")
register = AUGMENTERS.register


def build(name: str, **kwargs: Any) -> nn.Module:
    """Construct the augmenter registered as ``name``."""
    return AUGMENTERS.build(name, **kwargs)


def available() -> list[str]:
    """Registry keys of all augmenters."""
    return AUGMENTERS.available()
