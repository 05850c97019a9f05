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

from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch import nn

from deepmetric.errors import ConfigError
from deepmetric.losses.base import Batch, Indices, label_masks, make_distance, padded_rows, prepare
from deepmetric.losses.pair import multi_similarity_mining
from deepmetric.registry import Registry

MINERS: Registry[nn.Module] = Registry("miner")

_CHUNK_ELEMENTS = 2**24


class Miner(nn.Module):
    """Base class: validates the inputs (:func:`deepmetric.losses.base.prepare`) and calls ``mine``."""

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_embeddings: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> Indices:
        b = prepare(embeddings, labels, ref_embeddings, ref_labels)
        with torch.no_grad():
            b = Batch(b.x.detach(), b.labels, None if b.ref is None else b.ref.detach(), b.ref_labels)
            return self.mine(b)

    def mine(self, b: Batch) -> Indices:
        raise NotImplementedError


def _anchor_chunks(n_anchors: int, per_anchor: int) -> Iterator[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(per_anchor, 1))
    for start in range(0, n_anchors, step):
        yield slice(start, min(start + step, n_anchors))


def _per_positive(
    dist: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    select: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]],
) -> Indices:
    """Run ``select(d_ap [c, K, 1], d_an [c, 1, R], neg [c, 1, R])`` on anchor chunks of every positive pair.

    ``select`` returns ``(n [c, K], ok [c, K])`` (one negative per positive pair) and the result is the
    triplets ``(a, p, n)`` of the valid pairs with ``ok``.
    """
    p_idx, p_valid = padded_rows(pos)
    out_a, out_p, out_n = [], [], []
    for rows in _anchor_chunks(dist.shape[0], p_idx.shape[1] * dist.shape[1]):
        d = dist[rows]
        d_ap = d.gather(1, p_idx[rows])[:, :, None]
        n, ok = select(d_ap, d[:, None, :], neg[rows][:, None, :])
        keep = p_valid[rows] & ok
        a_loc, k = keep.nonzero(as_tuple=True)
        out_a.append(a_loc + rows.start)
        out_p.append(p_idx[rows][a_loc, k])
        out_n.append(n[a_loc, k])
    empty = dist.new_zeros(0, dtype=torch.long)
    return tuple(torch.cat(t) if t else empty for t in (out_a, out_p, out_n))


@MINERS.register("all_pairs")
class AllPairsMiner(Miner):
    """Every positive pair ``(a1, p)`` and every negative pair ``(a2, n)``."""

    def mine(self, b: Batch) -> Indices:
        pos, neg = label_masks(b)
        return (*pos.nonzero(as_tuple=True), *neg.nonzero(as_tuple=True))


@MINERS.register("all_triplets")
class AllTripletsMiner(Miner):
    """Every triplet ``(a, p, n)`` with ``y_a = y_p ≠ y_n`` (B·K·R of them: large, use with care)."""

    def mine(self, b: Batch) -> Indices:
        pos, neg = label_masks(b)
        p_idx, p_valid = padded_rows(pos)
        a, k, n = (p_valid[:, :, None] & neg[:, None, :]).nonzero(as_tuple=True)
        return a, p_idx[a, k], n


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
        pos, neg = label_masks(b)
        inf = torch.tensor(float("inf"), dtype=d.dtype, device=d.device)
        p = torch.where(pos, d, -inf).argmax(1)
        n = torch.where(neg, d, inf).argmin(1)
        (a,) = (pos.any(1) & neg.any(1)).nonzero(as_tuple=True)
        return a, p[a], n[a]


def _random_choice(mask: torch.Tensor) -> torch.Tensor:
    """One uniformly random True column per row of ``[..., R]`` (arbitrary where a row has none)."""
    return torch.rand(mask.shape, device=mask.device).masked_fill_(~mask, -1.0).argmax(-1)


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
        pos, neg = label_masks(b)
        if self.convention == "roth":
            return self._roth(d, pos, neg)
        if self.convention == "all":
            return self._all(d, pos, neg)
        return _per_positive(d, pos, neg, self._facenet)

    @staticmethod
    def _facenet(d_ap, d_an, neg):
        inf = torch.tensor(float("inf"), dtype=d_an.dtype, device=d_an.device)
        outside = neg & (d_an > d_ap)
        nearest_outside = torch.where(outside, d_an, inf).argmin(-1)
        farthest = torch.where(neg, d_an, -inf).argmax(-1)
        n = torch.where(outside.any(-1), nearest_outside, farthest)
        return n, neg.any(-1).expand_as(n)

    def _all(self, d, pos, neg) -> Indices:
        p_idx, p_valid = padded_rows(pos)
        out = []
        for rows in _anchor_chunks(d.shape[0], p_idx.shape[1] * d.shape[1]):
            d_ap = d[rows].gather(1, p_idx[rows])[:, :, None]
            d_an = d[rows][:, None, :]
            ok = p_valid[rows][:, :, None] & neg[rows][:, None, :] & (d_an > d_ap) & (d_an < d_ap + self.margin)
            a, k, n = ok.nonzero(as_tuple=True)
            out.append((a + rows.start, p_idx[rows][a, k], n))
        return tuple(torch.cat(t) for t in zip(*out))

    def _roth(self, d, pos, neg) -> Indices:
        (a,) = (pos.any(1) & neg.any(1)).nonzero(as_tuple=True)
        p = _random_choice(pos[a])
        d_a = d[a]
        d_ap = d_a.gather(1, p[:, None])
        window = neg[a] & (d_a > d_ap) & (d_a < d_ap + self.margin)
        n = torch.where(window.any(1), _random_choice(window), _random_choice(neg[a]))
        return a, p, n

    def extra_repr(self) -> str:
        return f"margin={self.margin}, convention={self.convention!r}, distance={self.distance}"


def distance_weights(
    d: torch.Tensor, neg: torch.Tensor, dim: int, cutoff: float = 0.5, nonzero_loss_cutoff: float = 1.4
) -> torch.Tensor:
    """Distance-weighted sampling probabilities (Wu et al., ICCV 2017) for the negatives of each row.

    For unit vectors in R^n, pairwise distances have density ``q(d) ∝ d^{n−2} (1 − d²/4)^{(n−3)/2}``;
    negatives get ``w ∝ 1/q(max(d, cutoff))``, computed in log space with the row maximum subtracted,
    ``w = 0`` for non-negatives and for ``d ≥ nonzero_loss_cutoff`` (zero margin loss), rows normalised
    to 1. A row with negatives but no admissible one is uniform over its negatives; a row without
    negatives is all zeros.
    """
    dc = d.clamp(min=cutoff)
    log_w = (2.0 - dim) * dc.log() - ((dim - 3) / 2) * (1 - 0.25 * dc * dc).clamp(min=1e-8).log()
    allowed = neg & (d < nonzero_loss_cutoff)
    log_w = log_w.masked_fill(~allowed, float("-inf"))
    row_max = log_w.amax(1, keepdim=True)
    w = torch.exp(log_w - torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)))
    w = torch.where(allowed.any(1, keepdim=True), w, neg.to(w.dtype))
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
        pos, neg = label_masks(b)
        w = distance_weights(d, neg, b.x.shape[1], self.cutoff, self.nonzero_loss_cutoff)
        p_idx, p_valid = padded_rows(pos)
        has_neg = neg.any(1)
        keep = p_valid & has_neg[:, None]
        if p_idx.shape[1] == 0 or not bool(keep.any()):
            empty = d.new_zeros(0, dtype=torch.long)
            return empty, empty, empty
        rows = has_neg.nonzero(as_tuple=True)[0]
        n = torch.zeros_like(p_idx)
        n[rows] = torch.multinomial(w[rows], p_idx.shape[1], replacement=True)
        a, k = keep.nonzero(as_tuple=True)
        return a, p_idx[a, k], n[a, k]

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
        pos, neg = multi_similarity_mining(self.distance(b.x, b.ref), *label_masks(b), self.epsilon)
        return (*pos.nonzero(as_tuple=True), *neg.nonzero(as_tuple=True))

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}"


def build(name: str, **kwargs: Any) -> nn.Module:
    """Construct the miner registered as ``name``."""
    return MINERS.build(name, **kwargs)


def available() -> list[str]:
    """Registry keys of all miners."""
    return MINERS.available()
