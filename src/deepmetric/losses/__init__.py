"""Losses. Contract: ``loss(embeddings[B, D], labels[B], indices=None) -> scalar tensor``.

``build(name, **kwargs)`` constructs a registered loss (keywords are checked against its constructor);
``available()`` lists the registry keys. Add a loss by decorating its class with ``@register("key")``
in the module of its family and importing that module below.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from deepmetric.registry import Registry

LOSSES: Registry[nn.Module] = Registry("loss")
register = LOSSES.register


def build(name: str, **kwargs: Any) -> nn.Module:
    """Construct the loss registered as ``name``."""
    return LOSSES.build(name, **kwargs)


def available() -> list[str]:
    """Registry keys of all losses."""
    return LOSSES.available()


from deepmetric.losses import pair, probabilistic, proxy  # noqa: E402,F401  (registers the pair-, proxy- and probabilistic losses)
