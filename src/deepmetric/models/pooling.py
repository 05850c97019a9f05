"""Global pooling of a convolutional feature map, and a wrapper that puts it on any timm CNN."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepmetric.errors import ConfigError, InputError, suggest

POOLS = ("avg", "max", "avg+max")


def check_pool(pool: str) -> str:
    if pool not in POOLS:
        raise ConfigError(f"unknown pool {pool!r}.{suggest(pool, POOLS)} Valid: {', '.join(POOLS)}")
    return pool


class GlobalPool(nn.Module):
    """``[B, C, H, W] -> [B, C]``: ``avg`` (global average pooling), ``max`` (global max pooling) or
    ``avg+max``, their **sum** ``GAP(x) + GMP(x)``, as in the Proxy-Anchor code (Kim et al. 2020), which
    most later DML code copies. (timm's ``global_pool="avgmax"`` is the *mean* of the two, half of this.)
    """

    def __init__(self, pool: str = "avg"):
        super().__init__()
        self.pool = check_pool(pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise InputError(
                f"pool={self.pool!r} pools a convolutional feature map [B, C, H, W], got shape {tuple(x.shape)}; "
                "use it with CNN backbones (ResNet, BN-Inception), not with transformers"
            )
        if self.pool == "avg":
            return F.adaptive_avg_pool2d(x, 1).flatten(1)
        if self.pool == "max":
            return F.adaptive_max_pool2d(x, 1).flatten(1)
        return F.adaptive_avg_pool2d(x, 1).flatten(1) + F.adaptive_max_pool2d(x, 1).flatten(1)

    def extra_repr(self) -> str:
        return f"pool={self.pool!r}"


class PooledFeatures(nn.Module):
    """A timm model's unpooled ``forward_features`` map, pooled by :class:`GlobalPool` (its own head unused)."""

    def __init__(self, model: nn.Module, pool: str):
        super().__init__()
        self.model, self.global_pool = model, GlobalPool(pool)
        self.num_features = model.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.global_pool(self.model.forward_features(x))
