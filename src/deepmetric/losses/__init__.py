"""Losses. Contract: ``loss(embeddings[B, D], labels[B], indices=None) -> scalar tensor``.

``build(name, **kwargs)`` constructs a registered loss (keywords are checked against its constructor);
``available()`` lists the registry keys. Add a loss by decorating its class with ``@register("key")``
in the module of its family and importing that module below.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from deepmetric.errors import ConfigError
from deepmetric.registry import Registry

LOSSES: Registry[nn.Module] = Registry("loss")
register = LOSSES.register


def build(name: str, **kwargs: Any) -> nn.Module:
    """Construct the loss registered as ``name``."""
    return LOSSES.build(name, **kwargs)


def available() -> list[str]:
    """Registry keys of all losses."""
    return LOSSES.available()


def build_with_context(spec: str | dict[str, Any], **context: Any) -> nn.Module:
    """Construct a loss from ``spec`` (a registry key, or ``{"name": key, **keywords}``), adding each ``context``
    keyword (e.g. ``num_classes``, ``embedding_size``) that its constructor takes and ``spec`` does not give.
    Losses made of other losses (``hybrid``, ``ensemble``) build their members this way."""
    kwargs = {"name": spec} if isinstance(spec, str) else dict(spec)
    if "name" not in kwargs:
        raise ConfigError(f"a member loss needs a name, e.g. {{name: multi_similarity}}; got {spec!r}")
    name = kwargs.pop("name")
    return LOSSES.build_in_context(name, context, **kwargs)


from deepmetric.losses import pair, probabilistic, proxy, ranking  # noqa: E402,F401  (registers the pair-, proxy-, probabilistic and ranking losses)
from deepmetric.losses import prototypical  # noqa: E402,F401  (prototypical networks, episodic; see deepmetric.fewshot)
from deepmetric.losses import bayesian, ensemble, hybrid  # noqa: E402,F401  (CBML; losses made of other losses)
