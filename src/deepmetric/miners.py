"""Miners: ``miner(embeddings, labels, ref_embeddings=None, ref_labels=None) -> index tuple``.

Pairs are ``(a1, p, a2, n)``, triplets ``(a, p, n)``; anchors index ``embeddings``, ``p``/``n`` index the
references (the batch itself by default, self-pairs excluded). Any pair-based loss accepts either through
``indices=``. Miners run without gradients, are vectorised (no loop over anchors) and never allocate
O(B³): per-positive work is ``[B, K, R]`` with K the largest number of positives of an anchor, computed
in anchor chunks of at most ``2**24`` elements.

Registry keys: ``all_pairs``, ``all_triplets``, ``batch_hard``, ``semi_hard``, ``distance_weighted``,
``multi_similarity``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import nn

from deepmetric.distances import full_precision
from deepmetric.errors import ConfigError
from deepmetric.losses.base import BIG, Batch, Indices, Pairs, make_distance, make_pairs, prepare
from deepmetric.losses.pair import multi_similarity_mining
from deepmetric.registry import Registry

MINERS: Registry[nn.Module] = Registry("miner")

_CHUNK_ELEMENTS = 2**24


class Miner(nn.Module):
    """Base class: validates the inputs (:func:`deepmetric.losses.base.prepare`) and calls ``mine`` without
    gradients and with autocast disabled (distances in float32, as the losses compute them)."""

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_embeddings: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> Indices:
        b = prepare(embeddings, labels, ref_embeddings, ref_labels)
        with torch.no_grad(), full_precision(b.x.device.type):
            b = Batch(b.x.detach(), b.labels, None if b.ref is None else b.ref.detach(), b.ref_labels)
            return self.mine(b)

    def mine(self, b: Batch) -> Indices:
        raise NotImplementedError


def _anchor_chunks(n_anchors: int, per_anchor: int) -> Iterator[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(per_anchor, 1))
    for start in range(0, n_anchors, step):
        yield slice(start, min(start + step, n_anchors))


def _positive_pairs(pairs: Pairs) -> tuple[torch.Tensor, torch.Tensor]:
    a, k = (pairs.pos_w > 0).nonzero(as_tuple=True)
    return a, pairs.pos_idx[a, k]


def _both(pairs: Pairs) -> torch.Tensor:
    """Anchors with at least one positive and one negative."""
    return ((pairs.pos_w.sum(1) > 0) & (pairs.neg.sum(1) > 0)).nonzero(as_tuple=True)[0]


def _random_choice(weights: torch.Tensor) -> torch.Tensor:
    """Per row, a uniformly random column among those with weight > 0 (arbitrary if there is none)."""
    return (torch.rand(weights.shape, device=weights.device) + 2 * (weights > 0).to(weights.dtype)).argmax(-1)


@MINERS.register("all_pairs")
class AllPairsMiner(Miner):
    """Every positive pair ``(a1, p)`` and every negative pair ``(a2, n)``."""

    def mine(self, b: Batch) -> Indices:
        pairs = make_pairs(b, None)
        return (*_positive_pairs(pairs), *(pairs.neg > 0).nonzero(as_tuple=True))


@MINERS.register("all_triplets")
class AllTripletsMiner(Miner):
    """Every triplet ``(a, p, n)`` with ``y_a = y_p ≠ y_n`` (B·K·R of them: large, use with care)."""

    def mine(self, b: Batch) -> Indices:
        pairs = make_pairs(b, None)
        a, k, n = ((pairs.pos_w > 0)[:, :, None] & (pairs.neg > 0)[:, None, :]).nonzero(as_tuple=True)
        return a, pairs.pos_idx[a, k], n


class _DistanceMiner(Miner):
    def __init__(self, distance: str, normalize: bool):
        super().__init__()
        self.distance = make_distance(distance, normalize)

    def dissimilarity(self, b: Batch) -> torch.Tensor:
        """Smaller = closer (similarities are negated)."""
        return self.distance.dissimilarity(b.x, b.ref)


@MINERS.register("batch_hard")
class BatchHardMiner(_DistanceMiner):
    """Batch-hard mining (Hermans, Beyer & Leibe 2017): for each anchor with a positive and a negative,
    ``(a, argmax_{p∈P_a} D_ap, argmin_{n∈N_a} D_an)``; ties go to the lowest index.

    Default distance: squared Euclidean on L2-normalised embeddings (the ``triplet`` loss default; the
    ranking is that of Euclidean distance).
    """

    def __init__(self, distance: str = "squared_euclidean", normalize: bool = True):
        super().__init__(distance, normalize)

    def mine(self, b: Batch) -> Indices:
        d = self.dissimilarity(b)
        same = b.labels[:, None] == b.ref_labels[None, :]  # dense [B, R] masks: a few passes, no [B, K] rows
        d_an, n = d.masked_fill(same, float("inf")).min(1)  # min/max return the first (lowest) index of ties
        if b.self_ref:
            same.fill_diagonal_(False)
        d_ap, p = d.masked_fill(~same, float("-inf")).max(1)
        a = ((d_ap > float("-inf")) & (d_an < float("inf"))).nonzero(as_tuple=True)[0]  # d is finite
        return a, p.index_select(0, a), n.index_select(0, a)


@MINERS.register("semi_hard")
class SemiHardMiner(_DistanceMiner):
    """Semi-hard negatives (Schroff, Kalenichenko & Philbin, FaceNet, CVPR 2015), one of three conventions:

    * ``facenet`` (default; TensorFlow's ``triplet_semihard_loss``): for every positive pair (a, p),
      ``n = argmin {D_an : D_an > D_ap}``; if no negative is farther than p, the farthest negative.
    * ``roth`` (Roth et al. 2020's code): one random positive per anchor; n uniform among
      ``D_ap < D_an < D_ap + margin``, else a uniformly random negative.
    * ``all`` (PML's ``TripletMarginMiner(type_of_triplets="semihard")``): every triplet with
      ``D_ap < D_an < D_ap + margin``.

    Defaults: margin 0.2 on squared Euclidean distance of L2-normalised embeddings (FaceNet). Ties go to
    the lowest index. Anchors without a positive or a negative yield nothing.
    """

    def __init__(
        self,
        margin: float = 0.2,
        convention: Literal["facenet", "roth", "all"] = "facenet",
        distance: str = "squared_euclidean",
        normalize: bool = True,
    ):
        super().__init__(distance, normalize)
        if convention not in ("facenet", "roth", "all"):
            raise ConfigError(f"convention must be 'facenet', 'roth' or 'all', got {convention!r}")
        self.margin, self.convention = margin, convention

    def mine(self, b: Batch) -> Indices:
        d = self.dissimilarity(b)
        pairs = make_pairs(b, None)
        if self.convention == "roth":
            return self._roth(d, pairs)
        d_ap = pairs.positives(d)
        pos_ok = pairs.pos_w > 0
        neg_ok = pairs.neg > 0
        d_neg = d - pairs.neg_add  # non-negatives at +BIG
        farthest = (d + pairs.neg_add).argmax(1)
        has_neg = neg_ok.any(1)
        out = []
        for rows in _anchor_chunks(d.shape[0], d_ap.shape[1] * d.shape[1]):
            ap, an = d_ap[rows][:, :, None], d[rows][:, None, :]
            if self.convention == "all":
                ok = (an > ap) & (an < ap + self.margin) & neg_ok[rows][:, None, :] & pos_ok[rows][:, :, None]
                a, k, n = ok.nonzero(as_tuple=True)
            else:  # facenet
                masked = d_neg[rows][:, None, :] + (an <= ap).to(d.dtype) * BIG
                nearest, n_near = masked.min(-1)
                n_all = torch.where(nearest < BIG / 2, n_near, farthest[rows][:, None])
                a, k = (pos_ok[rows] & has_neg[rows][:, None]).nonzero(as_tuple=True)
                n = n_all[a, k]
            out.append((a + rows.start, pairs.pos_idx[rows][a, k], n))
        return tuple(torch.cat(t) for t in zip(*out))

    def _roth(self, d: torch.Tensor, pairs: Pairs) -> Indices:
        a = _both(pairs)
        k = _random_choice(pairs.pos_w[a])
        p = pairs.pos_idx[a, k]
        d_a = d[a]
        d_ap = d_a.gather(1, p[:, None])
        window = pairs.neg[a] * ((d_a > d_ap) & (d_a < d_ap + self.margin)).to(d.dtype)
        n = torch.where(window.sum(1) > 0, _random_choice(window), _random_choice(pairs.neg[a]))
        return a, p, n

    def extra_repr(self) -> str:
        return f"margin={self.margin}, convention={self.convention!r}, distance={self.distance}"


def distance_weights(
    d: torch.Tensor, neg: torch.Tensor, dim: int, cutoff: float = 0.5, nonzero_loss_cutoff: float = 1.4
) -> torch.Tensor:
    """Distance-weighted sampling probabilities (Wu et al., ICCV 2017) for the negatives of each row.

    For unit vectors in R^n, pairwise distances have density ``q(d) ∝ d^{n−2} (1 − d²/4)^{(n−3)/2}``;
    negatives (``neg``: 0/1 float or bool ``[B, R]``) get ``w ∝ 1/q(max(d, cutoff))``, computed in log
    space with the row maximum subtracted, ``w = 0`` for non-negatives and for ``d ≥ nonzero_loss_cutoff``
    (zero margin loss), rows normalised to 1. A row with negatives but no admissible one is uniform over
    its negatives; a row without negatives is all zeros.
    """
    neg = neg.to(d.dtype)
    dc = d.clamp(min=cutoff)
    log_w = (2.0 - dim) * dc.log() - ((dim - 3) / 2) * (1 - 0.25 * dc * dc).clamp(min=1e-8).log()
    allowed = neg * (d < nonzero_loss_cutoff).to(d.dtype)
    log_w = log_w + (allowed - 1) * BIG
    w = torch.exp(log_w - log_w.amax(1, keepdim=True).clamp(min=-BIG / 2))
    w = w + neg * (allowed.sum(1, keepdim=True) == 0).to(d.dtype)  # all-zero rows: uniform over negatives
    return w / w.sum(1, keepdim=True).clamp(min=torch.finfo(w.dtype).tiny)


@MINERS.register("distance_weighted")
class DistanceWeightedMiner(Miner):
    """Distance-weighted sampling (Wu, Manmatha, Smola & Krähenbühl, ICCV 2017): for every anchor and
    each of its positives, one negative drawn (with replacement) from :func:`distance_weights`, on the
    Euclidean distance of L2-normalised embeddings with n = embedding dimension.

    Defaults cutoff = 0.5 and nonzero_loss_cutoff = 1.4 (= α + β₀ of the margin loss) follow the
    official code, except that a row with no admissible negative samples uniformly among its negatives
    (the official code samples among all indices). O(B·R) memory (PML's implementation is O(B³)). With
    large n the weights become very peaked; the method was designed for 128-d embeddings. Uses the global
    torch RNG (seed it for reproducible mining).
    """

    def __init__(self, cutoff: float = 0.5, nonzero_loss_cutoff: float = 1.4):
        super().__init__()
        self.cutoff, self.nonzero_loss_cutoff = cutoff, nonzero_loss_cutoff
        self.distance = make_distance("euclidean", True)

    def mine(self, b: Batch) -> Indices:
        d = self.distance(b.x, b.ref)
        pairs = make_pairs(b, None)
        rows = _both(pairs)
        k = pairs.pos_idx.shape[1]
        if rows.numel() == 0:
            empty = d.new_zeros(0, dtype=torch.long)
            return empty, empty, empty
        w = distance_weights(d[rows], pairs.neg[rows], b.x.shape[1], self.cutoff, self.nonzero_loss_cutoff)
        n = torch.multinomial(w, k, replacement=True)
        r, j = (pairs.pos_w[rows] > 0).nonzero(as_tuple=True)
        return rows[r], pairs.pos_idx[rows][r, j], n[r, j]

    def extra_repr(self) -> str:
        return f"cutoff={self.cutoff}, nonzero_loss_cutoff={self.nonzero_loss_cutoff}"


@MINERS.register("multi_similarity")
class MultiSimilarityMiner(Miner):
    """Multi-similarity pair mining (Wang et al., CVPR 2019) on cosine similarity, as pairs: negative n of
    anchor a is kept if ``s_an + ε > min_p s_ap``, positive p if ``s_ap − ε < max_n s_an`` (ε = 0.1)."""

    def __init__(self, epsilon: float = 0.1):
        super().__init__()
        self.epsilon = epsilon
        self.distance = make_distance("cosine", True)

    def mine(self, b: Batch) -> Indices:
        pairs = multi_similarity_mining(self.distance(b.x, b.ref), make_pairs(b, None), self.epsilon)
        return (*_positive_pairs(pairs), *(pairs.neg > 0).nonzero(as_tuple=True))

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}"


def build(name: str, **kwargs: Any) -> nn.Module:
    """Construct the miner registered as ``name``."""
    return MINERS.build(name, **kwargs)


def available() -> list[str]:
    """Registry keys of all miners."""
    return MINERS.available()
