"""Hybrid pair + proxy loss on global and local heads (Ebrahimpour, Qian & Beach, WACV 2022, arXiv 2112.14327)
[recon: from the abstract; no code was found]. The multi-head model is ``model.head: multi_head``
(:class:`deepmetric.models.multihead.MultiHeadEmbedding`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deepmetric.errors import ConfigError, InputError
from deepmetric.losses import build_with_context, register
from deepmetric.validation import check_embeddings, check_labels


def head_sizes(embedding_size: int, heads: int | list[int] | None, model: nn.Module | None) -> list[int]:
    """How an embedding of ``embedding_size`` splits into heads: ``heads`` (a count of equal heads, or the
    sizes), else the model head's ``embedding_sizes`` (``multi_head``), else one head."""
    if heads is None:
        sizes = list(getattr(getattr(model, "head", None), "embedding_sizes", None) or [embedding_size])
    elif isinstance(heads, int):
        if heads < 1 or embedding_size % heads:
            raise ConfigError(f"heads={heads} must be >= 1 and divide embedding_size={embedding_size}")
        sizes = [embedding_size // heads] * heads
    else:
        sizes = [int(h) for h in heads]
    if sum(sizes) != embedding_size or min(sizes) < 1:
        raise ConfigError(f"the head sizes {sizes} must be positive and add up to embedding_size={embedding_size}")
    return sizes


def split_heads(embeddings: torch.Tensor, labels: torch.Tensor, sizes: list[int], name: str) -> tuple[torch.Tensor, ...]:
    """Check ``embeddings [B, Σ sizes]`` and the labels; the per-head column blocks."""
    check_embeddings(embeddings)
    check_labels(labels, embeddings.shape[0])
    if embeddings.shape[1] != sum(sizes):
        raise InputError(f"{name} was built for embeddings of {sum(sizes)} = {' + '.join(map(str, sizes))} (heads) "
                         f"dimensions, got {embeddings.shape[1]}; build it with the model's embedding_size")
    return embeddings.split(sizes, dim=1)


@register("hybrid")
class HybridLoss(nn.Module):
    """Hybrid loss (Ebrahimpour et al. 2022): on each head h (a block of the embedding's columns),

    ``L_h = L_proxy(x_h) + λ·L_pair(x_h)``,  ``L = Σ_h L_h``,

    with Proxy-Anchor (α = 32, δ = 0.1; own proxies per head) as the proxy loss and multi-similarity
    (α = 2, β = 50, λ_MS = 0.5) as the pair loss, λ (``lam``) = 1 — the spec's provisional defaults. ``proxy``
    and ``pair`` name any registered losses (``{name: ..., keyword: value}``), built once per head.
    The heads are the model's (``model.head: multi_head``; filled in by the objective), or ``heads`` (a
    count of equal heads, or their sizes); with a single-head model this is Proxy-Anchor + λ·MS on the
    whole embedding. Pairs come from the labels (mined indices and a cross-batch memory are not used).
    Proxies need a larger learning rate: ``optimizer.loss_lr_mult`` (Proxy-Anchor: 100). Each step's
    ``L_proxy`` and ``L_pair`` per head are kept in ``last_parts`` (``proxy0``, ``pair0``, …) and logged.
    """

    uses_references = False

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        model: nn.Module | None = None,
        heads: int | list[int] | None = None,
        lam: float = 1.0,
        proxy: str | dict[str, Any] = "proxy_anchor",
        pair: str | dict[str, Any] = "multi_similarity",
    ):
        super().__init__()
        if lam < 0:
            raise ConfigError(f"hybrid: lam must be >= 0, got {lam}")
        self.sizes = head_sizes(embedding_size, heads, model)
        self.lam = float(lam)
        self.proxy = nn.ModuleList(build_with_context(proxy, num_classes=num_classes, embedding_size=d) for d in self.sizes)
        self.pair = nn.ModuleList(build_with_context(pair, num_classes=num_classes, embedding_size=d) for d in self.sizes)

    def parts(self, embeddings: torch.Tensor, labels: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(L_proxy(x_h), L_pair(x_h)) for each head h]``."""
        blocks = split_heads(embeddings, labels, self.sizes, "hybrid")
        return [(proxy(x, labels), pair(x, labels)) for proxy, pair, x in zip(self.proxy, self.pair, blocks)]

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, indices: Any = None) -> torch.Tensor:
        if indices is not None:
            raise ConfigError("hybrid pairs the samples of the batch by label and does not use mined indices; "
                              "remove the miner (miner.name=null)")
        parts = self.parts(embeddings, labels)
        self.last_parts = {f"{kind}{h}": v.detach() for h, pq in enumerate(parts) for kind, v in zip(("proxy", "pair"), pq)}
        return sum(p + self.lam * q for p, q in parts)

    def extra_repr(self) -> str:
        return f"heads={self.sizes}, lam={self.lam}"
