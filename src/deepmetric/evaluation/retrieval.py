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

import numpy as np
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


def _count_at_least(scores: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    if scores.device.type == "cpu":  # numpy's compare + count is ~3x faster than torch's bool sum
        return torch.from_numpy(np.count_nonzero(scores.numpy() >= floor.numpy()[:, None], axis=1))
    return (scores >= floor.unsqueeze(1)).sum(dim=1)


def _top_ascending(scores: torch.Tensor, group: torch.Tensor, k: int, buffer: torch.Tensor) -> torch.Tensor:
    """The k largest scores of the rows ``group``, sorted ascending (numpy's SIMD partition + sort on
    CPU); the rows are gathered into ``buffer``, reused to spare page faults."""
    rows = torch.index_select(scores, 0, group, out=buffer[: group.numel()])
    if scores.device.type != "cpu":
        return rows.topk(k, dim=1).values.flip(1)
    a = rows.numpy()
    if k < a.shape[1]:
        a.partition(a.shape[1] - k, axis=1)
        a = a[:, a.shape[1] - k :]
    return torch.from_numpy(np.sort(a, axis=1))


def _row_groups(counts: torch.Tensor, max_elements: int, max_rows: int = 256) -> list[torch.Tensor]:
    """Rows ordered by count, cut into groups of at most ``max_rows`` whose padded size
    rows x max(count) fits ``max_elements``."""
    order = counts.argsort().tolist()
    sizes = counts.tolist()
    groups, current = [], []
    for r in order:
        if current and (len(current) == max_rows or (len(current) + 1) * sizes[r] > max_elements):
            groups.append(current)
            current = []
        current.append(r)
    groups.append(current)
    return [torch.tensor(g, dtype=torch.long, device=counts.device) for g in groups if sizes[g[-1]] > 0]


def average_precision(
    scores: torch.Tensor,
    pairs: tuple[torch.Tensor, torch.Tensor],
    n_rel: torch.Tensor,
    max_elements: int,
) -> torch.Tensor:
    """Average precision over the full ranking of each row of a score chunk (higher score = nearer).

    ``AP = (1/R) sum_{j=1..R} j / rank_j`` with ``rank_j`` the rank of the j-th relevant item under
    the key (score desc, gallery index asc): ``rank = #{score > s} + #{score == s, index < i} + 1``.
    ``pairs`` are the relevant (row, column) pairs (:func:`relevant_pairs`). Only items scoring at
    least a row's lowest relevant score can precede a relevant item, so each row's top-c (c = their
    number) is selected and sorted, in groups of at most ``max_elements`` scores, and the ranks are
    binary searches into it; exact ties (rare) are counted directly. No full sort of a row happens
    unless its last relevant item is ranked last.
    """
    rows, cols = pairs
    n_rows, n_cols = scores.shape
    pos = scores[rows, cols]
    floor = torch.full((n_rows,), torch.inf, device=scores.device).scatter_reduce_(0, rows, pos, reduce="amin")
    first = torch.cat([n_rel.new_zeros(1), n_rel.cumsum(0)[:-1]])
    slot = torch.arange(rows.numel(), device=rows.device) - first[rows]
    width = int(n_rel.max()) if n_rel.numel() else 0
    pos_pad = torch.full((n_rows, max(width, 1)), torch.inf, device=scores.device)
    pos_pad[rows, slot] = pos
    greater = torch.zeros(pos_pad.shape, dtype=torch.long, device=scores.device)
    at_least = torch.zeros_like(greater)
    counts = _count_at_least(scores, floor)
    groups = _row_groups(counts, max_elements)
    buffer = scores.new_empty(max((g.numel() for g in groups), default=0), n_cols)
    for group in groups:
        top = _top_ascending(scores, group, int(counts[group[-1]]), buffer)
        k, p = top.shape[1], pos_pad[group]
        greater[group] = k - torch.searchsorted(top, p, right=True)
        at_least[group] = k - torch.searchsorted(top, p, right=False)
    rank = greater[rows, slot] + 1
    tied = (at_least[rows, slot] - greater[rows, slot] > 1).nonzero().squeeze(1)
    step = max(1, max_elements // max(n_cols, 1))
    for t in tied.split(step):  # items with exactly the same score rank before it if their index is lower
        before = torch.arange(n_cols, device=scores.device) < cols[t].unsqueeze(1)
        rank[t] += ((scores[rows[t]] == pos[t].unsqueeze(1)) & before).sum(dim=1)
    rank_pad = torch.full(pos_pad.shape, torch.inf, dtype=torch.float64, device=scores.device)
    rank_pad[rows, slot] = rank.double()
    rank_pad = rank_pad.sort(dim=1).values
    j = torch.arange(1, rank_pad.shape[1] + 1, device=scores.device, dtype=torch.float64)
    return (j / rank_pad).sum(dim=1) / n_rel.clamp_min(1)
