"""Pair-based losses: contrastive, triplet, N-pair, margin, multi-similarity, circle, SupCon, NT-Xent.

All take ``(embeddings [B, D], labels [B], indices=None, ref_embeddings=None, ref_labels=None)`` and
return a scalar. ``indices`` are pairs ``(a1, p, a2, n)`` or triplets ``(a, p, n)`` from any miner;
``ref_embeddings``/``ref_labels`` replace the batch as the other side of each pair (cross-batch memory).
Everything is computed on one ``[B, R]`` similarity/distance matrix with masks; half precision is
computed in float32.
"""

from __future__ import annotations

import torch

from deepmetric.losses import register
from deepmetric.losses.base import (
    Batch,
    Indices,
    PairLoss,
    both_present,
    make_distance,
    masked_logsumexp,
    pair_masks,
)


def multi_similarity_mining(
    sim: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-similarity pair mining (Wang et al., CVPR 2019) on a similarity matrix.

    Keeps negative ``n`` of anchor ``i`` if ``s_in + ε > min_{p∈P_i} s_ip`` and positive ``p`` if
    ``s_ip − ε < max_{n∈N_i} s_in``, min and max over the unmined candidate sets ``pos``/``neg``.
    """
    with torch.no_grad():
        inf = torch.tensor(float("inf"), dtype=sim.dtype, device=sim.device)
        min_pos = torch.where(pos, sim, inf).amin(1, keepdim=True)
        max_neg = torch.where(neg, sim, -inf).amax(1, keepdim=True)
        return pos & (sim - epsilon < max_neg), neg & (sim + epsilon > min_pos)


@register("multi_similarity")
class MultiSimilarityLoss(PairLoss):
    """Multi-similarity loss (Wang, Han, Huang, Dong & Scott, CVPR 2019), on cosine similarity s:

    ``L = 1/B Σ_i [ 1/α·log(1 + Σ_{p∈P̃_i} e^{−α(s_ip − λ)}) + 1/β·log(1 + Σ_{n∈Ñ_i} e^{β(s_in − λ)}) ]``

    where P̃_i, Ñ_i are the pairs kept by :func:`multi_similarity_mining` (``mining=True``), or all
    candidate pairs (``mining=False``; candidates = label pairs, or the pairs of ``indices``).
    Reduction: mean over the B anchors (anchors without pairs contribute 0); 0 if the batch has no
    positive or no negative pair.

    Defaults α = 2, β = 50, λ (``base``) = 0.5, ε = 0.1 follow the official code and PML; the paper's text
    gives λ = 1, and the official config's β (``SCALE_NEG``) is 40.

    ``parity=True`` reproduces the official code's quirks: positives with s ≥ 1 − 1e-5 (the anchor itself
    and exact duplicates) are dropped before mining, and anchors whose mined positive or negative set is
    empty contribute 0 (the divisor stays B).
    """

    def __init__(
        self,
        alpha: float = 2.0,
        beta: float = 50.0,
        base: float = 0.5,
        epsilon: float = 0.1,
        mining: bool = True,
        parity: bool = False,
    ):
        super().__init__()
        self.alpha, self.beta, self.base, self.epsilon = alpha, beta, base, epsilon
        self.mining, self.parity = mining, parity
        self.distance = make_distance("cosine", True)

    def compute(self, b: Batch, indices: Indices | None) -> torch.Tensor:
        sim = self.matrix(b)
        pos, neg = pair_masks(b, indices)
        if self.parity:
            pos = pos & (sim.detach() < 1 - 1e-5)
        if self.mining:
            pos, neg = multi_similarity_mining(sim.detach(), pos, neg, self.epsilon)
        pos_term = masked_logsumexp(-self.alpha * (sim - self.base), pos, add_one=True) / self.alpha
        neg_term = masked_logsumexp(self.beta * (sim - self.base), neg, add_one=True) / self.beta
        per_anchor = pos_term + neg_term
        if self.parity:
            per_anchor = per_anchor * (pos.any(1) & neg.any(1))
        return per_anchor.sum() / sim.shape[0] * both_present(pos, neg)

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, beta={self.beta}, base={self.base}, epsilon={self.epsilon}, "
            f"mining={self.mining}, parity={self.parity}"
        )
