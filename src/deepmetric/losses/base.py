"""Machinery shared by the pair-based losses and the miners.

* :func:`prepare` validates ``(embeddings, labels[, ref_embeddings, ref_labels])`` and casts half
  precision to float32. Without references, the batch is compared with itself and the diagonal
  (self-pairs) is excluded; with references (e.g. a cross-batch memory), every anchor-reference pair counts.
* Index tuples from miners: pairs ``(a1, p, a2, n)`` or triplets ``(a, p, n)``, anchors indexing
  ``embeddings`` and ``p``/``n`` indexing the references. :func:`to_pairs` converts triplets to pairs;
  :func:`make_pairs` turns labels or any tuple into :class:`Pairs` (each anchor's positives as padded
  ``[B, K]`` rows, negatives as a dense ``[B, R]`` float mask), which is also how pairs become (all)
  triplets.
* :func:`masked_logsumexp` (``log Σ e^x`` or ``log(1 + Σ e^x)`` over a mask, finite gradients even for
  empty rows) and :func:`reduce` (``mean`` / ``avg_nonzero`` / ``sum`` over a mask).

Empty sets always give a zero loss that is still connected to the graph (it back-propagates zeros).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from deepmetric import distances
from deepmetric.distances import Distance, as_compute_dtype, full_precision
from deepmetric.errors import ConfigError, InputError
from deepmetric.validation import check_embeddings, check_labels

Indices = tuple[torch.Tensor, ...]
Reduction = Literal["mean", "avg_nonzero", "sum"]
REDUCTIONS = ("mean", "avg_nonzero", "sum")


@dataclass
class Batch:
    """Validated inputs: anchors ``x [B, D]`` with ``labels``; references ``ref [R, D]`` with ``ref_labels``.

    ``ref`` is ``None`` when the batch is compared with itself (then ``ref_labels is labels``).
    """

    x: torch.Tensor
    labels: torch.Tensor
    ref: torch.Tensor | None
    ref_labels: torch.Tensor

    @property
    def self_ref(self) -> bool:
        return self.ref is None

    @property
    def shape(self) -> tuple[int, int]:
        return self.x.shape[0], self.ref_labels.shape[0]


def prepare(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ref_embeddings: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
) -> Batch:
    """Check shapes, dtypes and finiteness (clear errors) and cast half precision to float32."""
    check_embeddings(embeddings)
    check_labels(labels, embeddings.shape[0])
    if (ref_embeddings is None) != (ref_labels is None):
        raise InputError("pass ref_embeddings and ref_labels together (or neither)")
    if ref_embeddings is None:
        if embeddings.shape[0] < 2:
            raise InputError(
                f"need at least 2 embeddings to form pairs, got {embeddings.shape[0]}; "
                "use a larger batch or pass ref_embeddings/ref_labels"
            )
        return Batch(as_compute_dtype(embeddings), labels, None, labels)
    check_embeddings(ref_embeddings, "ref_embeddings")
    check_labels(ref_labels, ref_embeddings.shape[0], "ref_labels")
    if ref_embeddings.shape[0] == 0:
        raise InputError("ref_embeddings is empty (e.g. a cross-batch memory before its first enqueue)")
    if ref_embeddings.shape[1] != embeddings.shape[1]:
        raise InputError(
            f"ref_embeddings have dimension {ref_embeddings.shape[1]} but embeddings have "
            f"{embeddings.shape[1]}"
        )
    x = as_compute_dtype(embeddings)
    return Batch(x, labels, as_compute_dtype(ref_embeddings).to(x.dtype), ref_labels)


def make_distance(name: str, normalize: bool) -> Distance:
    """The distance ``name``; ``normalize`` is ignored by cosine, which always normalises."""
    if distances.DISTANCES.get(name).is_similarity:  # unknown names raise, listing the valid keys
        return distances.build(name)
    return distances.build(name, normalize=normalize)


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ConfigError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


# ----------------------------------------------------------------------------------------- index tuples


def check_indices(indices: Indices, n_anchors: int, n_refs: int) -> Indices:
    """Require a tuple of 3 (triplets) or 4 (pairs) equal-length 1-D integer tensors within range."""
    if not isinstance(indices, (tuple, list)) or len(indices) not in (3, 4):
        raise InputError(
            "indices must be pairs (a1, p, a2, n) or triplets (a, p, n) of index tensors, got "
            f"{type(indices).__name__} of length {len(indices) if isinstance(indices, (tuple, list)) else '?'}"
        )
    for i, t in enumerate(indices):
        if not isinstance(t, torch.Tensor) or t.ndim != 1 or t.is_floating_point() or t.dtype == torch.bool:
            raise InputError(f"indices[{i}] must be a 1-D integer tensor")
    if len(indices) == 3 and not indices[0].shape == indices[1].shape == indices[2].shape:
        raise InputError("triplet indices (a, p, n) must have equal lengths")
    if len(indices) == 4 and (indices[0].shape != indices[1].shape or indices[2].shape != indices[3].shape):
        raise InputError("pair indices (a1, p, a2, n) need len(a1) == len(p) and len(a2) == len(n)")
    anchors = indices[0::2] if len(indices) == 4 else indices[:1]
    others = indices[1::2] if len(indices) == 4 else indices[1:]
    for group, size, what in ((anchors, n_anchors, "anchor"), (others, n_refs, "reference")):
        t = group[0] if len(group) == 1 else torch.cat([g.to(group[0].device) for g in group])
        if t.numel():
            lo, hi = torch.stack(torch.aminmax(t)).tolist()  # one reduction and one host sync per group
            if lo < 0 or hi >= size:
                raise InputError(f"{what} indices must lie in [0, {size}), got [{lo}, {hi}]")
    return tuple(indices)


def to_pairs(indices: Indices) -> Indices:
    """Triplets ``(a, p, n)`` -> pairs ``(a, p, a, n)``; pairs are returned unchanged."""
    return (indices[0], indices[1], indices[0], indices[2]) if len(indices) == 3 else tuple(indices)


BIG = 1e30  # additive-mask magnitude: exp(x - BIG) == 0 in float32 and float64


def label_positives(b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Each anchor's same-label references (without the anchor itself when the batch is its own
    reference), left-aligned in ``[B, K]`` rows; returns ``(idx, valid)``.

    O(B·K + R log R) (a sort and a binary search), no ``[B, R]`` work.
    """
    sorted_labels, order = torch.sort(b.ref_labels, stable=True)
    start = torch.searchsorted(sorted_labels, b.labels)
    count = torch.searchsorted(sorted_labels, b.labels, right=True).sub_(start)
    if b.self_ref:  # skip the anchor's own slot in its class block
        rank_self = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        rank_self -= start
        count -= 1
    k = max(int(count.max()) if count.numel() else 0, 1)  # K ≥ 1 keeps row reductions defined
    slots = torch.arange(k, device=order.device)[None, :]
    cols = start[:, None] + slots
    if b.self_ref:
        cols += slots >= rank_self[:, None]
    return order[cols.clamp_(max=max(order.numel() - 1, 0))], slots < count[:, None]


@dataclass
class Pairs:
    """Positive and negative pairs of a batch, in the form the losses consume.

    * ``pos_idx [B, K]``, ``pos_w [B, K]``: each anchor's positives as padded rows (gather a ``[B, R]``
      matrix with :meth:`positives`); ``pos_w`` is 1 for a pair (its multiplicity with
      ``multiplicity=True``), 0 for padding. K is small (positives per anchor), so positive-side work
      is O(B·K).
    * ``neg [B, R]``: negative pairs as a dense 0/1 (or multiplicity) matrix.

    Masks are float: on CPU, bool ``where``/``masked_fill``/``sum`` over ``[B, R]`` cost several times a
    float multiply. Excluded entries of a log-sum-exp are removed by adding ``-BIG`` (:attr:`neg_add`).
    """

    pos_idx: torch.Tensor
    pos_w: torch.Tensor
    neg: torch.Tensor

    def positives(self, m: torch.Tensor) -> torch.Tensor:
        """``m[a, p]`` for every (padded) positive pair, ``[B, K]``."""
        return m.gather(1, self.pos_idx)

    @property
    def pos_add(self) -> torch.Tensor:
        return (self.pos_w.clamp(max=1) - 1) * BIG

    @property
    def neg_add(self) -> torch.Tensor:
        return (self.neg.clamp(max=1) - 1) * BIG

    def present(self) -> torch.Tensor:
        """Float scalar, 1 if there is at least one positive and one negative pair, else 0. Losses are
        multiplied by it, so a batch of one class (or of singletons) gives a 0 that back-propagates."""
        return ((self.pos_w.sum() > 0) & (self.neg.sum() > 0)).to(self.neg.dtype)


def make_pairs(b: Batch, indices: Indices | None, multiplicity: bool = False) -> Pairs:
    """:class:`Pairs` from the labels (positives: same label, not the anchor itself; negatives: different
    label) or from mined ``indices`` (pairs, or triplets via :func:`to_pairs`).

    Mined tuples are trusted (not re-checked against the labels). A pair listed several times counts
    once, or as often as listed with ``multiplicity=True``.
    """
    n_a, n_r = b.shape
    dev, dtype = b.x.device, b.x.dtype
    if indices is None:
        idx, valid = label_positives(b)
        # every other label is a negative (the anchor itself has its own label)
        neg = (b.labels[:, None] != b.ref_labels[None, :]).to(dtype)
        return Pairs(idx, valid.to(dtype), neg)
    a1, p, a2, n = (t.to(dev) for t in to_pairs(check_indices(indices, n_a, n_r)))
    key, counts = torch.unique(a1 * n_r + p, return_counts=True)  # sorted by anchor
    a, p = key // n_r, key % n_r
    per_anchor = torch.bincount(a, minlength=n_a)
    k = max(int(per_anchor.max()) if a.numel() else 0, 1)
    rank = torch.arange(a.numel(), device=dev) - (torch.cumsum(per_anchor, 0) - per_anchor)[a]
    pos_idx = torch.zeros(n_a, k, dtype=torch.long, device=dev)
    pos_w = torch.zeros(n_a, k, dtype=dtype, device=dev)
    pos_idx[a, rank] = p
    pos_w[a, rank] = counts.to(dtype) if multiplicity else 1.0
    neg = torch.zeros(n_a, n_r, dtype=dtype, device=dev)
    neg.index_put_((a2, n), torch.ones(n.numel(), dtype=dtype, device=dev), accumulate=multiplicity)
    return Pairs(pos_idx, pos_w, neg)


# ------------------------------------------------------------------------------------ numerical pieces


class _Take(torch.autograd.Function):
    """``m.reshape(-1)[flat]`` with the backward ``zeros.scatter_add_(flat, g)``: autograd's backward of
    ``take`` / advanced indexing is an accumulating ``put_``, ~7x slower on CPU (48k entries of a
    128 x 128 matrix: 240 µs against 35 µs)."""

    @staticmethod
    def forward(ctx, m: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        ctx.shape = m.shape
        ctx.save_for_backward(flat)
        return m.reshape(-1).index_select(0, flat)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (flat,) = ctx.saved_tensors
        out = grad.new_zeros(ctx.shape.numel()).scatter_add_(0, flat, grad)  # differentiable in grad
        return out.view(ctx.shape), None


def take(m: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``m[rows, cols]`` for a 2-D ``m`` and index vectors, with a fast backward."""
    return _Take.apply(m, rows * m.shape[1] + cols)


def count_ones(mask: torch.Tensor) -> torch.Tensor:
    """``Σ mask`` of a 0/1 float tensor: a float32 running sum stops counting at 2^24 (2^24 + 1 rounds to
    2^24), so a mask that large is summed in float64 and rounded once to the mask's dtype."""
    return mask.sum() if mask.numel() < 1 << 24 else mask.sum(dtype=torch.float64).to(mask.dtype)


def masked_logsumexp(
    x: torch.Tensor, mask: torch.Tensor, dim: int = -1, add_one: bool = False
) -> torch.Tensor:
    """``log Σ e^x`` along ``dim`` (``log(1 + Σ e^x)`` with ``add_one``), stably, over the kept entries.

    ``mask`` is a bool mask (True = kept) or an additive float mask (0 = kept, ``-BIG`` = excluded, e.g.
    :attr:`Pairs.neg_add`; cheaper on CPU). Excluded entries contribute exactly 0 and get zero gradient.
    Rows with nothing kept give −inf (0 with ``add_one``) and zero gradients.
    """
    add = (mask.to(x.dtype) - 1) * BIG if mask.dtype == torch.bool else mask
    z = x + add
    m = z.amax(dim, keepdim=True).detach()
    if add_one:
        m = m.clamp(min=0)
        return m.squeeze(dim) + torch.log(torch.exp(z - m).sum(dim) + torch.exp(-m).squeeze(dim))
    empty = m < -BIG / 2
    m = m.masked_fill(empty, 0.0)
    s = torch.exp(z - m).sum(dim) + empty.squeeze(dim).to(z.dtype)
    return (m.squeeze(dim) + torch.log(s)).masked_fill(empty.squeeze(dim), float("-inf"))


def reduce(values: torch.Tensor, weights: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Reduce ``values`` over the entries with weight 1 (``weights`` is a 0/1 float mask; None = all).

    ``mean``: mean over the mask; ``avg_nonzero``: mean over the masked entries that are > 0 (PML's
    ``AvgNonZeroReducer``; values must be ≥ 0); ``sum``. An empty selection gives 0, still attached to
    the graph. Values must be finite everywhere (0 × inf would be NaN).
    """
    kept = values if weights is None else values * weights
    total = kept.sum()
    if reduction == "sum":
        return total
    if reduction == "mean" and weights is None:
        return total / max(values.numel(), 1)
    # sign() of values >= 0 is 0/1: ~10x cheaper than count_nonzero on CPU
    count = count_ones(torch.sign(kept.detach())) if reduction == "avg_nonzero" else weights.sum()
    return total / count.clamp(min=1)


class PairLoss(nn.Module):
    """Base of the pair-based losses.

    ``forward(embeddings, labels, indices=None, ref_embeddings=None, ref_labels=None) -> scalar`` validates
    the inputs (:func:`prepare`) and calls ``self.compute(batch, indices)`` with autocast disabled, so that
    distances and log-sum-exps stay in float32 inside a mixed-precision region.
    """

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices: Indices | None = None,
        ref_embeddings: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b = prepare(embeddings, labels, ref_embeddings, ref_labels)
        with full_precision(b.x.device.type):
            return self.compute(b, indices)

    def compute(self, b: Batch, indices: Indices | None) -> torch.Tensor:
        raise NotImplementedError

    def terms(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices: Indices | None = None,
        ref_embeddings: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss's positive and negative / entropy parts (Sors et al. 2021's decomposition), for the
        losses that implement :meth:`compute_terms`; how they add up is in each loss's docstring."""
        return self.compute_terms(prepare(embeddings, labels, ref_embeddings, ref_labels), indices)

    def compute_terms(self, b: Batch, indices: Indices | None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} has no positive/negative decomposition")

    def matrix(self, b: Batch) -> torch.Tensor:
        """``self.distance`` between anchors and references ``[B, R]``."""
        return self.distance(b.x, b.ref)
