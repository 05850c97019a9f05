"""Machinery shared by the pair-based losses and the miners.

* :func:`prepare` validates ``(embeddings, labels[, ref_embeddings, ref_labels])`` and casts half
  precision to float32. Without references, the batch is compared with itself and the diagonal
  (self-pairs) is excluded; with references (e.g. a cross-batch memory), every anchor-reference pair counts.
* Index tuples from miners: pairs ``(a1, p, a2, n)`` or triplets ``(a, p, n)``, anchors indexing
  ``embeddings`` and ``p``/``n`` indexing the references. :func:`to_pairs` converts triplets to pairs;
  :func:`pair_masks` turns labels or any tuple into dense ``[B, R]`` positive/negative masks;
  :func:`padded_rows` lists each anchor's positives, which is how pairs become (all) triplets.
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
from deepmetric.distances import Distance, as_compute_dtype
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
        for t in group:
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= size):
                raise InputError(f"{what} indices must lie in [0, {size}), got [{int(t.min())}, {int(t.max())}]")
    return tuple(indices)


def to_pairs(indices: Indices) -> Indices:
    """Triplets ``(a, p, n)`` -> pairs ``(a, p, a, n)``; pairs are returned unchanged."""
    return (indices[0], indices[1], indices[0], indices[2]) if len(indices) == 3 else tuple(indices)


def label_masks(b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``pos[i, j]``: same label (``i ≠ j`` without references); ``neg[i, j]``: different label."""
    same = b.labels[:, None] == b.ref_labels[None, :]
    neg = ~same
    if b.self_ref:
        same.fill_diagonal_(False)
    return same, neg


def pair_masks(b: Batch, indices: Indices | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive/negative ``[B, R]`` masks from the labels, or from mined ``indices`` (pairs or triplets).

    Mined tuples are trusted (not re-checked against the labels); a pair mined several times counts once.
    """
    if indices is None:
        return label_masks(b)
    n_a, n_r = b.shape
    a1, p, a2, n = to_pairs(check_indices(indices, n_a, n_r))
    dev = b.x.device
    pos = torch.zeros(n_a, n_r, dtype=torch.bool, device=dev)
    neg = torch.zeros(n_a, n_r, dtype=torch.bool, device=dev)
    pos[a1.to(dev), p.to(dev)] = True
    neg[a2.to(dev), n.to(dev)] = True
    return pos, neg


def padded_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column indices of the True entries of each row, left-aligned in a ``[rows, K]`` tensor.

    ``K`` is the largest row count; returns ``(idx, valid)`` with padding ``idx = 0, valid = False``.
    O(rows·cols) time; used to enumerate each anchor's positives without a Python loop.
    """
    counts = mask.sum(1)
    k = int(counts.max()) if mask.shape[0] else 0
    rows, cols = mask.nonzero(as_tuple=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(rows.numel(), device=mask.device) - starts[rows]
    idx = torch.zeros(mask.shape[0], k, dtype=torch.long, device=mask.device)
    idx[rows, rank] = cols
    valid = torch.arange(k, device=mask.device)[None, :] < counts[:, None]
    return idx, valid


# ------------------------------------------------------------------------------------ numerical pieces


def masked_logsumexp(
    x: torch.Tensor, mask: torch.Tensor, dim: int = -1, add_one: bool = False
) -> torch.Tensor:
    """``log Σ_{mask} e^x`` along ``dim`` (``log(1 + Σ_{mask} e^x)`` with ``add_one``), stably.

    Masked-out entries never reach ``exp`` (they are set to −inf first), so they get exactly zero gradient
    whatever their value. Rows with nothing kept give −inf (0 with ``add_one``) and zero gradients.
    """
    x = x.masked_fill(~mask, float("-inf"))
    m = x.amax(dim, keepdim=True).detach()
    if add_one:
        m = m.clamp(min=0)
        s = torch.exp(x - m).sum(dim) + torch.exp(-m).squeeze(dim)
        return m.squeeze(dim) + torch.log(s)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.exp(x - m).sum(dim)
    nonempty = s > 0
    out = m.squeeze(dim) + torch.log(torch.where(nonempty, s, torch.ones_like(s)))
    return out.masked_fill(~nonempty, float("-inf"))


def reduce(values: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce ``values`` over the entries where ``mask`` is True.

    ``mean``: mean over the mask; ``avg_nonzero``: mean over the masked entries that are > 0 (PML's
    ``AvgNonZeroReducer``); ``sum``. An empty selection gives 0, still attached to the graph.
    """
    kept = torch.where(mask, values, torch.zeros_like(values))
    total = kept.sum()
    if reduction == "sum":
        return total
    count = (mask & (values > 0)).sum() if reduction == "avg_nonzero" else mask.sum()
    return total / count.clamp(min=1)


def both_present(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Bool scalar: at least one positive and one negative pair. Losses are multiplied by it, so a batch
    of a single class (or of singletons) gives 0 that still back-propagates (zeros), without a host sync."""
    return pos.any() & neg.any()


class PairLoss(nn.Module):
    """Base of the pair-based losses.

    ``forward(embeddings, labels, indices=None, ref_embeddings=None, ref_labels=None) -> scalar`` validates
    the inputs (:func:`prepare`) and calls ``self.compute(batch, indices)``.
    """

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices: Indices | None = None,
        ref_embeddings: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.compute(prepare(embeddings, labels, ref_embeddings, ref_labels), indices)

    def compute(self, b: Batch, indices: Indices | None) -> torch.Tensor:
        raise NotImplementedError

    def matrix(self, b: Batch) -> torch.Tensor:
        """``self.distance`` between anchors and references ``[B, R]``."""
        return self.distance(b.x, b.ref)
