"""Per-query retrieval metrics (pure functions; average them over queries yourself or use ``evaluate``).

Notation: query q, ``rel[q, i] = 1[label of the (i+1)-th neighbour == label of q]`` over neighbours
ranked by (distance asc, gallery index asc), and ``n_rel[q] = R_q``, the number of gallery items of
q's class other than q itself. Values for lone queries (``R_q = 0``) are 0; ``evaluate`` skips or keeps
them. All results are float64 tensors of shape ``[Q]``.

- ``recall@K``     = 1[exists i <= K: rel_i]  (the DML "hit", not IR recall)
- ``precision@K``  = (1/K) sum_{i<=K} rel_i
- ``r_precision``  = (1/R) sum_{i<=R} rel_i
- ``map@r``        = (1/R) sum_{i<=R} rel_i P@i          (Musgrave et al., "A Metric Learning
  Reality Check", ECCV 2020)
- ``map``          = (1/R) sum_{i<=|G|} rel_i P@i        (average precision over the full ranking;
  equals the per-query non-interpolated AUPRC)
- ``ndcg@K``       = DCG@K / IDCG@K, DCG@K = sum_{i<=K} rel_i / log2(i + 1),
  IDCG@K = sum_{i<=min(K, R)} 1 / log2(i + 1)            (as in Saeki et al., Multi-Proxy Anchor,
  arXiv 2110.03997)
"""

from __future__ import annotations

import torch


def _positions(k: int, device) -> torch.Tensor:
    return torch.arange(1, k + 1, device=device, dtype=torch.float64)


def recall_at_k(rel: torch.Tensor, k: int) -> torch.Tensor:
    """1 if any of the k nearest neighbours is relevant."""
    return rel[:, :k].any(dim=1).double()


def precision_at_k(rel: torch.Tensor, k: int) -> torch.Tensor:
    """Fraction of the k nearest neighbours that are relevant."""
    return rel[:, :k].sum(dim=1).double() / k


def _within_r(rel: torch.Tensor, n_rel: torch.Tensor) -> torch.Tensor:
    return torch.arange(rel.shape[1], device=rel.device) < n_rel.unsqueeze(1)


def r_precision(rel: torch.Tensor, n_rel: torch.Tensor) -> torch.Tensor:
    """Fraction of the R nearest neighbours that are relevant (needs ``rel.shape[1] >= max R``)."""
    hits = (rel & _within_r(rel, n_rel)).sum(dim=1).double()
    return hits / n_rel.clamp_min(1)


def map_at_r(rel: torch.Tensor, n_rel: torch.Tensor) -> torch.Tensor:
    """MAP@R: precision at each relevant rank within the first R, summed and divided by R."""
    relf = (rel & _within_r(rel, n_rel)).double()
    precision = relf.cumsum(dim=1) / _positions(rel.shape[1], rel.device)
    return (relf * precision).sum(dim=1) / n_rel.clamp_min(1)


def ndcg_at_k(rel: torch.Tensor, n_rel: torch.Tensor, k: int) -> torch.Tensor:
    """Binary-relevance nDCG@k with the ideal ranking putting min(k, R) relevant items first."""
    discount = 1.0 / torch.log2(_positions(k, rel.device) + 1.0)
    dcg = (rel[:, :k].double() * discount).sum(dim=1)
    ideal = torch.cat([discount.new_zeros(1), discount.cumsum(0)])[n_rel.clamp(max=k)]
    return torch.where(ideal > 0, dcg / ideal.clamp_min(1e-300), 0.0)


def _descending_key(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """int64 key sorting by (row asc, value desc); a stable sort keeps index order among ties."""
    bits = (values + 0.0).view(torch.int32).long()  # + 0.0 turns -0.0 into +0.0
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # monotone map float32 -> int
    return (rows << 33) + ((1 << 31) - ordered)


def relevant_pairs(
    q_codes: torch.Tensor, gallery_by_class: torch.Tensor, class_ptr: torch.Tensor, self_index: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, gallery index) of every relevant item of each query, the query itself excluded.

    ``gallery_by_class`` is the gallery indices sorted by class code, class c occupying
    ``class_ptr[c]:class_ptr[c + 1]``; ``self_index[q]`` is q's own gallery index in leave-one-out mode.
    """
    first, count = class_ptr[q_codes], class_ptr[q_codes + 1] - class_ptr[q_codes]
    rows = torch.repeat_interleave(torch.arange(q_codes.numel(), device=q_codes.device), count)
    offset = torch.arange(rows.numel(), device=rows.device) - torch.repeat_interleave(count.cumsum(0) - count, count)
    cols = gallery_by_class[first[rows] + offset]
    if self_index is not None:
        keep = cols != self_index[rows]
        rows, cols = rows[keep], cols[keep]
    return rows, cols


def average_precision(
    scores: torch.Tensor,
    q_codes: torch.Tensor,
    g_codes: torch.Tensor,
    pairs: tuple[torch.Tensor, torch.Tensor],
    n_rel: torch.Tensor,
    max_candidates: int,
) -> torch.Tensor:
    """Average precision over the full ranking of each row of a score chunk (higher score = nearer).

    ``AP = (1/R) sum_j j / rank_j`` over the relevant items j = 1..R in rank order, ranks by the key
    (score desc, gallery index asc). ``pairs`` are the relevant (row, column) pairs (see
    :func:`relevant_pairs`). Only items scoring at least a row's lowest-scoring relevant item can
    precede a relevant item, so only those candidates are sorted, in groups of at most
    ``max_candidates``; the cost follows the rank of the last relevant item, not ``|G| log |G|``.
    """
    n_rows = scores.shape[0]
    floor = torch.full((n_rows,), torch.inf, device=scores.device)
    floor.scatter_reduce_(0, pairs[0], scores[pairs], reduce="amin")
    candidates = scores >= floor.unsqueeze(1)
    counts = candidates.sum(dim=1)
    ends = counts.cumsum(0).cpu()
    ap = torch.zeros(n_rows, dtype=torch.float64, device=scores.device)
    start = 0
    while start < n_rows:  # groups of rows whose candidates fit in max_candidates
        base = int(ends[start - 1]) if start else 0
        stop = max(start + 1, int(torch.searchsorted(ends, base + max_candidates, right=True)))
        rows, cols = candidates[start:stop].nonzero(as_tuple=True)
        order = _descending_key(scores[start:stop][rows, cols], rows).sort(stable=True).indices
        rows, cols = rows[order], cols[order]
        is_rel = g_codes[cols] == q_codes[start + rows]
        first = torch.cat([rows.new_zeros(1), counts[start:stop].cumsum(0)[:-1]])
        rank = torch.arange(1, rows.numel() + 1, device=rows.device) - first[rows]
        hits = is_rel.cumsum(0)
        hits_before = torch.cat([hits.new_zeros(1), hits])[first][rows]
        contrib = torch.where(is_rel, (hits - hits_before).double() / rank.double(), 0.0)
        ap[start:stop].index_add_(0, rows, contrib)
        start = stop
    return ap / n_rel.clamp_min(1)
