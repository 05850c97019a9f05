"""A multi-head embedding head on a convolutional feature map: global and local (part) heads after a
second-order (non-local) attention enhancement (Ebrahimpour, Qian & Beach, WACV 2022, arXiv 2112.14327)
[recon: from the abstract; no code was found].

Each head is its own linear embedding; the output is the concatenation of the heads, so evaluation and any
single loss work unchanged, and losses that use the heads separately (``hybrid``, ``ensemble`` with
``split_heads``) split it by :attr:`MultiHeadEmbedding.embedding_sizes`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepmetric.errors import ConfigError, InputError
from deepmetric.models.head import HEADS


class NonLocalAttention(nn.Module):
    """Second-order (non-local) attention on a map ``X [B, C, H, W]`` (Wang et al. 2018's embedded-Gaussian
    block, as the hybrid paper describes it):

    ``X' = X + W·g(X)·softmax(θ(X)ᵀφ(X))``

    θ, φ, g are 1x1 convolutions to ``C / reduction`` channels; the softmax runs over the positions, so
    each position aggregates g at every position weighted by their pairwise (second-order) affinity. W is
    a 1x1 convolution back to C channels initialised at zero: the block starts as the identity.
    """

    def __init__(self, channels: int, reduction: int = 2):
        super().__init__()
        inner = max(channels // reduction, 1)
        self.theta, self.phi, self.g = (nn.Conv2d(channels, inner, 1) for _ in range(3))
        self.out = nn.Conv2d(inner, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        theta, phi, g = (f(x).flatten(2) for f in (self.theta, self.phi, self.g))  # [B, C', N]
        attention = torch.softmax(theta.transpose(1, 2) @ phi, dim=-1)  # [B, N, N], rows sum to 1
        y = (g @ attention.transpose(1, 2)).view(b, -1, h, w)  # y[:, :, i] = Σ_j a_ij g[:, :, j]
        return x + self.out(y)


@HEADS.register("multi_head")
class MultiHeadEmbedding(nn.Module):
    """Global and local embedding heads on a backbone feature map ``[B, C, H, W]``.

    * optional :class:`NonLocalAttention` on the map (``attention``);
    * ``global_heads`` heads on the globally average-pooled map; ``parts`` local heads, head k on the
      max-pooled k-th horizontal stripe of the map (part features);
    * every head is ``Linear(C, d)`` (+ BatchNorm1d), L2-normalised when ``normalize``, with
      ``d = embedding_size / (global_heads + parts)``.

    The output is the concatenation ``[√(w_1/Σw)·e_1, …, √(w_H/Σw)·e_H]`` (unit norm when normalised):
    the squared distance of two outputs is the ``w``-weighted mean of the heads' squared distances. The
    weights ``head_weights`` are 1 (all heads equal) unless a loss sets them (the ``ensemble`` loss with
    ``split_heads`` does: its learned loss weights, Zabihzadeh et al. 2021). ``raw`` is the concatenation
    of the heads before normalisation.

    The backbone must return its feature map unpooled: ``small_cnn`` with ``backbone_kwargs: {pool: none}``,
    a timm CNN with ``backbone_kwargs: {global_pool: ''}``.
    """

    def __init__(self, in_features: int, embedding_size: int = 128, batch_norm: bool = False, normalize: bool = True,
                 global_heads: int = 1, parts: int = 2, attention: bool = True, reduction: int = 2):
        super().__init__()
        n_heads = global_heads + parts
        if global_heads < 0 or parts < 0 or n_heads < 1:
            raise ConfigError(f"multi_head needs global_heads >= 0, parts >= 0 and at least one head, "
                              f"got global_heads={global_heads}, parts={parts}")
        if embedding_size % n_heads:
            raise ConfigError(f"multi_head splits model.embedding_size={embedding_size} into {n_heads} equal heads "
                              f"(global_heads={global_heads} + parts={parts}); choose a multiple of {n_heads}")
        self.global_heads, self.parts, self.normalize = global_heads, parts, normalize
        self.embedding_size = embedding_size
        d = embedding_size // n_heads
        self.attention = NonLocalAttention(in_features, reduction) if attention else nn.Identity()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(in_features, d), nn.BatchNorm1d(d) if batch_norm else nn.Identity())
            for _ in range(n_heads))
        self.register_buffer("head_weights", torch.ones(n_heads))

    @property
    def embedding_sizes(self) -> tuple[int, ...]:
        return tuple(h[0].out_features for h in self.heads)

    def set_head_weights(self, weights: torch.Tensor) -> None:
        """The weights of the heads in the output (detached; any positive values)."""
        self.head_weights.copy_(weights.detach().to(self.head_weights))

    def forward(self, features: torch.Tensor, return_raw: bool = False):
        if features.ndim != 4:
            raise InputError(
                f"the multi_head head needs the backbone's feature map [B, C, H, W], got shape {tuple(features.shape)}; "
                "use small_cnn with model.backbone_kwargs={pool: none}, or a timm CNN with {global_pool: ''}")
        if self.parts > features.shape[2]:
            raise InputError(f"multi_head: {self.parts} parts need a feature map at least {self.parts} rows high, "
                             f"got {features.shape[2]}; use fewer parts")
        x = self.attention(features)
        pooled = [x.mean((2, 3))] * self.global_heads
        if self.parts:
            pooled += list(F.adaptive_max_pool2d(x, (self.parts, 1)).flatten(2).unbind(2))
        raw = [head(f) for head, f in zip(self.heads, pooled)]
        scale = (self.head_weights / self.head_weights.sum()).sqrt().to(raw[0].dtype)
        out = torch.cat([(F.normalize(z, dim=-1) if self.normalize else z) * s for z, s in zip(raw, scale)], dim=1)
        return (torch.cat(raw, dim=1), out) if return_raw else out

    def extra_repr(self) -> str:
        return f"global_heads={self.global_heads}, parts={self.parts}, embedding_sizes={self.embedding_sizes}"
