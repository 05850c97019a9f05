"""Contrastive Bayesian metric learning (CBML; Kan, Cen, He, Shan, Ji, Wang & Zhang, TPAMI 2022,
arXiv 2210.04402; official code ``kanshichao/CBML``, ``losses/cbml.py``)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from deepmetric.errors import ConfigError
from deepmetric.losses import register
from deepmetric.losses.base import Batch, Indices, PairLoss, Pairs, make_distance, make_pairs, masked_logsumexp
from deepmetric.losses.pair import multi_similarity_mining

VARIANTS = ("log", "sqrt", "const")


@register("contrastive_bayesian")
class ContrastiveBayesianLoss(PairLoss):
    """CBML (Kan et al. 2022), on cosine similarity s. The posterior of "same label" given a similarity is
    logistic, σ((s − a)/b); −log of the posteriors aggregated over the mined sets gives, per anchor i,

    ``L_i = g(1 + Σ_{p∈P̃_i} e^{−(s_ip − a_p)/b_p}) + g(1 + Σ_{n∈Ñ_i} e^{(s_in − a_n)/b_n}) + w·V_i``

    with ``g = log`` (``variant="log"``, default) or ``sqrt``; ``variant="const"`` uses ``1 + c·Σ(…)`` for each
    term (c = ``const_weight``, the code's ``WEIGHT_P = WEIGHT_N = 0.25``). The **metric variance
    constraint** ``V_i = Σ_{n∈N_i} (s_in − μ_i)²`` with ``μ_i = h·mean(s_{P_i}) + (1 − h)·mean(s_{N_i})``
    is taken over the *unmined* sets (μ is not detached, as in the code).

    Pairs: positives with s ≥ 1 − 1e-5 (the anchor itself, exact duplicates) are dropped; P̃, Ñ are the
    multi-similarity mining of P, N with margin ε (:func:`~deepmetric.losses.pair.multi_similarity_mining`),
    or, with ``hard_negatives=k``, Ñ is the k most similar negatives (the code's ``ADAPTIVE_NEG=False``,
    k = 100). Anchors with an empty P, N, P̃ or Ñ are skipped; ``L = Σ_i L_i / B``.

    Defaults are the official code's: a_p = 0.5, b_p = 0.5, a_n = 1.0, b_n = 0.01, w = 1, h = 0.1 (its
    BN-Inception config uses 0.2), ε = 0.1.
    """

    def __init__(
        self,
        pos_a: float = 0.5,
        pos_b: float = 0.5,
        neg_a: float = 1.0,
        neg_b: float = 0.01,
        weight: float = 1.0,
        h: float = 0.1,
        epsilon: float = 0.1,
        variant: Literal["log", "sqrt", "const"] = "log",
        const_weight: float = 0.25,
        hard_negatives: int | None = None,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ConfigError(f"contrastive_bayesian: variant must be one of {VARIANTS}, got {variant!r}")
        if pos_b <= 0 or neg_b <= 0:
            raise ConfigError(f"contrastive_bayesian: the scales pos_b and neg_b must be > 0, got {pos_b}, {neg_b}")
        if hard_negatives is not None and hard_negatives < 1:
            raise ConfigError(f"contrastive_bayesian: hard_negatives must be >= 1 (or null), got {hard_negatives}")
        self.pos_a, self.pos_b, self.neg_a, self.neg_b = pos_a, pos_b, neg_a, neg_b
        self.weight, self.h, self.epsilon = weight, h, epsilon
        self.variant, self.const_weight, self.hard_negatives = variant, const_weight, hard_negatives
        self.distance = make_distance("cosine", True)

    def _g(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``g(1 + Σ_mask e^logits)`` per row (stable: from ``log Σ e^logits``)."""
        lse = masked_logsumexp(logits, mask)  # −inf for empty rows (those anchors are skipped)
        if self.variant == "log":
            return F.softplus(lse)
        if self.variant == "sqrt":
            return torch.exp(0.5 * F.softplus(lse))
        return 1 + self.const_weight * torch.exp(lse)

    def _mine(self, sim: torch.Tensor, pairs: Pairs) -> Pairs:
        mined = multi_similarity_mining(sim, pairs, self.epsilon)
        if self.hard_negatives is None:
            return mined
        with torch.no_grad():
            k = min(self.hard_negatives, sim.shape[1])
            top = (sim + pairs.neg_add).topk(k, dim=1).indices
            hard = torch.zeros_like(pairs.neg).scatter_(1, top, 1.0) * pairs.neg
        return Pairs(pairs.pos_idx, mined.pos_w, hard)

    def compute(self, b: Batch, indices: Indices | None) -> torch.Tensor:
        sim = self.matrix(b)
        pairs = make_pairs(b, indices)
        s_pos = pairs.positives(sim)
        pairs = Pairs(pairs.pos_idx, pairs.pos_w * (s_pos.detach() < 1 - 1e-5).to(sim.dtype), pairs.neg)
        mined = self._mine(sim.detach(), pairs)

        pos_term = self._g(-(s_pos - self.pos_a) / self.pos_b, mined.pos_add)
        neg_term = self._g((sim - self.neg_a) / self.neg_b, mined.neg_add)

        n_pos, n_neg = pairs.pos_w.sum(1), pairs.neg.sum(1)
        mu = (self.h * (s_pos * pairs.pos_w).sum(1) / n_pos.clamp(min=1)
              + (1 - self.h) * (sim * pairs.neg).sum(1) / n_neg.clamp(min=1))
        variance = (pairs.neg * (sim - mu[:, None]) ** 2).sum(1)

        valid = (n_pos > 0) & (n_neg > 0) & (mined.pos_w.sum(1) > 0) & (mined.neg.sum(1) > 0)
        per_anchor = torch.where(valid, pos_term + neg_term + self.weight * variance, torch.zeros_like(mu))
        return per_anchor.sum() / sim.shape[0]

    def extra_repr(self) -> str:
        return (f"pos_a={self.pos_a}, pos_b={self.pos_b}, neg_a={self.neg_a}, neg_b={self.neg_b}, "
                f"weight={self.weight}, h={self.h}, epsilon={self.epsilon}, variant={self.variant!r}, "
                f"hard_negatives={self.hard_negatives}")
