"""A deep ensemble as one embedding model (``model.members: k``; Lakshminarayanan, Pritzel & Blundell,
NeurIPS 2017, for classifiers): k networks of the same architecture with their own random initialisation,
each trained by its own copy of the loss (:class:`deepmetric.losses.members.PerMemberLoss`), the embedding
the concatenation ``[e_1, …, e_k] / √k`` of the members' L2-normalised embeddings. Its cosine similarity is
the mean of the members' cosines, and its squared Euclidean distance the mean of theirs.

:class:`ParallelBackbones` runs the k backbones on the same input and concatenates their features
(``[B, k·F]``); :class:`MemberHeads` splits them back and applies member i's head to block i. Both plug
into :class:`~deepmetric.models.head.EmbeddingModel` unchanged (``freeze_bn``, the backbone/head learning
rate groups, the product path and ONNX export see one model).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ParallelBackbones(nn.ModuleList):
    """``cat([b_1(x), …, b_k(x)], dim=1)``; ``num_features`` is the sum of the members' features."""

    def __init__(self, backbones: list[nn.Module]):
        super().__init__(backbones)
        self.sizes = [int(b.num_features) for b in backbones]
        self.num_features = sum(self.sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([b(x) for b in self], dim=1)


class MemberHeads(nn.ModuleList):
    """Member i's head on feature block i; the embedding ``cat(e_i) / √k`` when the heads L2-normalise (a unit
    vector again), ``cat(e_i)`` otherwise. ``return_raw=True`` also gives the concatenated pre-normalisation
    outputs. ``embedding_sizes`` lists the members' blocks (what :class:`PerMemberLoss` splits by)."""

    def __init__(self, heads: list[nn.Module], feature_sizes: list[int]):
        super().__init__(heads)
        if len(heads) != len(feature_sizes):
            raise ValueError(f"{len(heads)} heads for {len(feature_sizes)} feature blocks")
        self.feature_sizes = list(feature_sizes)
        self.normalize = all(getattr(h, "normalize", False) for h in heads)
        #: what a member's block is multiplied by to give that member's own embedding (√k when normalised)
        self.block_scale = math.sqrt(len(heads)) if self.normalize else 1.0
        self.scale = 1 / self.block_scale

    @property
    def embedding_sizes(self) -> tuple[int, ...]:
        return tuple(int(h.embedding_size) for h in self)

    @property
    def embedding_size(self) -> int:
        return sum(self.embedding_sizes)

    def forward(self, features: torch.Tensor, return_raw: bool = False):
        blocks = features.split(self.feature_sizes, dim=1)
        outs = [h(f, return_raw=True) for h, f in zip(self, blocks)]
        emb = torch.cat([e for _, e in outs], dim=1)
        if self.scale != 1.0:
            emb = emb * self.scale
        return (torch.cat([r for r, _ in outs], dim=1), emb) if return_raw else emb
