"""The prototypical-network loss (Snell, Swersky & Zemel, NeurIPS 2017): a batch is one episode.

Every class ``c`` of the batch is split, in batch order, into support items (its first ``s_c``) and query
items (the rest). The prototype is the mean support embedding ``p_c = (1/s_c) Σ_{i ∈ S_c} f(x_i)``; a
query ``x`` is classified by a softmax over negative squared Euclidean distances,
``p(y = c | x) = exp(−‖f(x) − p_c‖²) / Σ_c' exp(−‖f(x) − p_c'‖²)``, and the loss is the mean over
queries of ``−log p(y_x | x)``.

With the m-per-class sampler a batch is an episode of ``batch_size / m`` classes with ``m`` items each:
``support=k`` gives the paper's k-shot training episodes (``m − k`` queries per class). ``support``
as a fraction ``f`` gives ``s_c = max(1, ⌊f·m_c⌋)`` (at most ``m_c − 1``), which is how Scott et al.
(2018) adapt a prototypical network on the k target examples (``f = 0.75``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepmetric.distances import as_compute_dtype, build as build_distance
from deepmetric.errors import ConfigError, InputError
from deepmetric.losses import register
from deepmetric.validation import check_embeddings, check_labels


def rank_in_class(inverse: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Position of each item among the items of its class, in batch order (``inverse`` = class index)."""
    order = torch.argsort(inverse, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(inverse)
    rank[order] = torch.arange(inverse.numel(), device=inverse.device) - starts[inverse[order]]
    return rank


@register("prototypical")
class PrototypicalLoss(nn.Module):
    """Prototypical networks (Snell et al. 2017): softmax over ``−‖f(x) − p_c‖²`` to class-mean prototypes
    of the support part of each class; ``support`` = support items per class (int) or fraction (float).

    Classes that cannot give a support and a query item (fewer than ``support + 1`` items, or a single
    item) are left out of the episode; a batch with no such class is an error.
    """

    uses_references = False  # the batch is its own episode: no mined pairs, no cross-batch memory

    def __init__(self, support: int | float = 0.5):
        super().__init__()
        if isinstance(support, bool) or not isinstance(support, (int, float)):
            raise ConfigError(f"support must be an int (items per class) or a fraction in (0, 1), got {support!r}")
        if isinstance(support, float) and not 0 < support < 1:
            raise ConfigError(f"a fractional support must lie in (0, 1), got {support}")
        if isinstance(support, int) and support < 1:
            raise ConfigError(f"support must be at least 1 item per class, got {support}")
        self.support = support
        self.distance = build_distance("squared_euclidean")

    def split(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(class index [B], support mask [B], query mask [B], usable classes [C])`` of a batch."""
        _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        if isinstance(self.support, float):
            n_support = (self.support * counts).floor().long().clamp(min=1)
            n_support = torch.minimum(n_support, counts - 1)
            usable = counts >= 2
        else:
            n_support = torch.full_like(counts, self.support)
            usable = counts > self.support
        rank = rank_in_class(inverse, counts)
        support = (rank < n_support[inverse]) & usable[inverse]
        query = (rank >= n_support[inverse]) & usable[inverse]
        return inverse, support, query, usable

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor,
                indices: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        if indices is not None:
            raise ConfigError("the prototypical loss splits each class into support and query itself and "
                              "does not use mined indices; remove the miner (miner.name=null)")
        check_embeddings(embeddings)
        check_labels(labels, embeddings.shape[0])
        x = as_compute_dtype(embeddings)
        inverse, support, query, usable = self.split(labels.to(x.device).long())
        if not bool(usable.any()):
            need = self.support + 1 if isinstance(self.support, int) else 2
            raise InputError(
                f"the prototypical loss needs a class with at least {need} items in the batch (support "
                f"{self.support} + 1 query); got at most {int(torch.bincount(inverse).max())} per class: "
                "raise sampler.m or lower support"
            )
        n_classes = usable.numel()
        sums = x.new_zeros(n_classes, x.shape[1]).index_add(0, inverse[support], x[support])
        sizes = torch.bincount(inverse[support], minlength=n_classes).clamp(min=1).to(x.dtype)
        prototypes = (sums / sizes[:, None])[usable]
        # targets: the position of each query's class among the usable classes
        position = torch.cumsum(usable.long(), 0) - 1
        logits = -self.distance(x[query], prototypes)
        return F.cross_entropy(logits, position[inverse[query]])

    def extra_repr(self) -> str:
        return f"support={self.support}"
