"""Exact k-nearest neighbours for evaluation: chunked torch (CPU or CUDA) and faiss (exact flat index).

**Scores.** Neighbours are ranked by a score ``s(q, g)`` that decreases with the distance:

- ``cosine``: ``s = <q/|q|, g/|g|>``, distance ``1 - s``;
- ``euclidean``: ``s = <q, g> - |g|^2 / 2 = (|q|^2 - |q - g|^2) / 2``, distance ``sqrt(|q|^2 - 2 s)``.

Both are one matrix product of augmented float32 operands (see :func:`score_operands`), whatever the
input dtype, on the input's device.

**Ties.** The ranking key is *(distance ascending, gallery index ascending)* on the computed float32
scores, i.e. a stable sort: of two items at the same distance (e.g. exact duplicates) the lower index
ranks first. ``torch.topk`` does not promise this, so each top-k is re-sorted by the key, and rows whose
k-th and (k+1)-th scores tie are recomputed with a full stable sort.

**Leave-one-out.** Without a gallery the query set is searched against itself and the query is
excluded *by index* (its score is set to ``-inf``), never by value, so exact duplicates of a query
still count as neighbours.

**Memory.** Queries are processed in row chunks of ``chunk x |G|`` scores, the chunk chosen from a
byte budget, so memory is ``O(chunk * |G| + |Q| * k)``; the ``|Q| x |G|`` matrix is never built
unless it fits in the budget. For cosine leave-one-out with a small k, :func:`knn` instead walks the
upper triangle of ``B x B`` blocks and uses each block for both its rows and its columns
(``S = X X^T`` is symmetric), which halves the matrix-product work.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from deepmetric.errors import ConfigError, InputError, suggest

DISTANCES = ("cosine", "euclidean")
BACKENDS = ("auto", "torch", "faiss")
DEFAULT_MEMORY_BUDGET = 512 * 2**20
_BYTES_PER_SCORE = 12  # the float32 score plus room for top-k / sort workspaces
_SYMMETRIC_BLOCK = 2048
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "m": 2**20, "mb": 2**20, "g": 2**30, "gb": 2**30}


class Neighbors(NamedTuple):
    """``distances[q, j]`` and gallery ``indices[q, j]`` of the j-th nearest neighbour of query q."""

    distances: torch.Tensor
    indices: torch.Tensor


def parse_memory_budget(budget: int | str) -> int:
    """Bytes from an int or a string such as ``"512MB"`` / ``"2 GiB"``."""
    if isinstance(budget, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]?)(i?b)?\s*", budget.lower())
        if not m:
            raise ConfigError(f"memory_budget {budget!r} is not a size such as 512MB or 2GB")
        budget = int(float(m.group(1)) * _UNITS[m.group(2) + ("b" if m.group(3) else "")])
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 2**10:
        raise ConfigError(f"memory_budget must be at least 1 KiB (bytes or '512MB'), got {budget!r}")
    return budget


def check_distance(distance: str) -> str:
    if distance not in DISTANCES:
        raise ConfigError(f"unknown distance {distance!r}; choose one of {DISTANCES}.{suggest(distance, DISTANCES)}")
    return distance


def score_operands(x: torch.Tensor, distance: str, side: str) -> torch.Tensor:
    """Float32 operands whose products are the scores: ``s = q_op @ g_op.T`` (side 'query'/'gallery')."""
    x = x.float()
    if distance == "cosine":
        return F.normalize(x, dim=1)
    extra = torch.full((x.shape[0], 1), -0.5, dtype=x.dtype, device=x.device)
    if side == "gallery":
        extra = (x * x).sum(1, keepdim=True)
    return torch.cat([x, extra], dim=1)


def scores_to_distances(scores: torch.Tensor, query: torch.Tensor, distance: str) -> torch.Tensor:
    if distance == "cosine":
        return 1.0 - scores
    qsq = (query.float() ** 2).sum(1, keepdim=True)
    return (qsq - 2.0 * scores).clamp_min_(0.0).sqrt_()


def chunk_rows(n_cols: int, memory_budget: int, bytes_per_score: int = _BYTES_PER_SCORE) -> int:
    """Rows per chunk so that ``rows x n_cols`` scores and their workspaces fit in the budget."""
    return max(1, memory_budget // (bytes_per_score * max(n_cols, 1)))


def score_chunks(
    q_op: torch.Tensor, g_op: torch.Tensor, *, exclude_self: bool, rows: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, scores[start:start + rows])``; in leave-one-out mode the self-score is ``-inf``."""
    for start in range(0, q_op.shape[0], rows):
        s = q_op[start : start + rows] @ g_op.T
        if exclude_self:
            s[:, start : start + s.shape[0]].diagonal().fill_(-torch.inf)
        yield start, s


def sort_by_key(values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order each row by (score descending, index ascending)."""
    order = indices.argsort(dim=1)
    values, indices = values.gather(1, order), indices.gather(1, order)
    order = values.argsort(dim=1, descending=True, stable=True)
    return values.gather(1, order), indices.gather(1, order)


def topk_scores(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of each row under the (score desc, index asc) key, without a full sort."""
    kk = min(k + 1, scores.shape[1])
    values, indices = scores.topk(kk, dim=1)
    values, indices = sort_by_key(values, indices)
    if kk > k:
        tied = (values[:, k - 1] == values[:, k]).nonzero().squeeze(1)
        if tied.numel():  # the k-th place is shared with items topk may have dropped
            v, i = scores[tied].sort(dim=1, descending=True, stable=True)
            values[tied], indices[tied] = v[:, :kk], i[:, :kk]
    return values[:, :k], indices[:, :k]


def _knn_chunked(q_op, g_op, k, exclude_self, memory_budget):
    rows = chunk_rows(g_op.shape[0], memory_budget)
    parts = [topk_scores(s, k) for _, s in score_chunks(q_op, g_op, exclude_self=exclude_self, rows=rows)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _merge(best: tuple[torch.Tensor, torch.Tensor], new_v: torch.Tensor, new_i: torch.Tensor, kk: int):
    v = torch.cat([best[0], new_v], dim=1)
    i = torch.cat([best[1], new_i], dim=1)
    v, pos = v.topk(min(kk, v.shape[1]), dim=1)
    return v, i.gather(1, pos)


def _knn_symmetric(x_op: torch.Tensor, k: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Leave-one-out top-k from the upper-triangular blocks of ``X X^T`` (each block serves twice)."""
    n = x_op.shape[0]
    kk = min(k + 1, n)
    starts = list(range(0, n, block))
    best = [None] * len(starts)
    for bi, i0 in enumerate(starts):
        xi = x_op[i0 : i0 + block]
        for bj in range(bi, len(starts)):
            j0 = starts[bj]
            s = xi @ x_op[j0 : j0 + block].T
            if bi == bj:
                s.diagonal().fill_(-torch.inf)
            for b, r0, c0, m in ((bi, i0, j0, s), (bj, j0, i0, s.T.contiguous() if bi != bj else None)):
                if m is None:
                    continue
                v, idx = m.topk(min(kk, m.shape[1]), dim=1)
                idx += c0
                best[b] = (v, idx) if best[b] is None else _merge(best[b], v, idx, kk)
    values, indices = sort_by_key(torch.cat([b[0] for b in best]), torch.cat([b[1] for b in best]))
    if kk > k:
        tied = (values[:, k - 1] == values[:, k]).nonzero().squeeze(1)
        if tied.numel():
            s = x_op[tied] @ x_op.T
            s[torch.arange(tied.numel(), device=s.device), tied] = -torch.inf
            v, i = s.sort(dim=1, descending=True, stable=True)
            values[tied], indices[tied] = v[:, :kk], i[:, :kk]
    return values[:, :k], indices[:, :k]


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _knn_faiss(q_op, g_op, k, exclude_self, memory_budget):
    """faiss ``IndexFlatIP`` on the score operands; the result is re-keyed and ties fixed by torch."""
    import faiss

    q_np = np.ascontiguousarray(q_op.cpu().numpy())
    g_np = np.ascontiguousarray(g_op.cpu().numpy())
    index = faiss.IndexFlatIP(g_np.shape[1])
    index.add(g_np)
    n_g = g_np.shape[0]
    kk = min(k + 1 + int(exclude_self), n_g)  # one extra column to detect a tie at the k-th place
    rows = chunk_rows(n_g, memory_budget)
    vals, idxs = [], []
    for start in range(0, q_np.shape[0], rows):
        v, i = index.search(q_np[start : start + rows], kk)
        v, i = torch.from_numpy(v), torch.from_numpy(i)
        if exclude_self:  # drop the query's own id; if it is not there, drop the last column
            own = torch.arange(start, start + v.shape[0]).unsqueeze(1)
            is_self = i == own
            drop = torch.where(is_self.any(1), is_self.int().argmax(1), torch.full_like(own[:, 0], kk - 1))
            keep = torch.ones_like(is_self)
            keep[torch.arange(v.shape[0]), drop] = False
            v, i = v[keep].view(v.shape[0], kk - 1), i[keep].view(v.shape[0], kk - 1)
        vals.append(v)
        idxs.append(i)
    values, indices = sort_by_key(torch.cat(vals), torch.cat(idxs))
    if values.shape[1] > k:
        tied = (values[:, k - 1] == values[:, k]).nonzero().squeeze(1)
        if tied.numel():
            s = q_op.cpu()[tied] @ g_op.cpu().T
            if exclude_self:
                s[torch.arange(tied.numel()), tied] = -torch.inf
            v, i = s.sort(dim=1, descending=True, stable=True)
            values[tied], indices[tied] = v[:, : values.shape[1]], i[:, : values.shape[1]]
    return values[:, :k].to(q_op.device), indices[:, :k].to(q_op.device)


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto``: faiss for CPU tensors when it is installed, torch otherwise (CUDA, or no faiss)."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {BACKENDS}.{suggest(backend, BACKENDS)}")
    if backend == "faiss" and not faiss_available():
        raise ConfigError("backend='faiss' needs the faiss package: pip install faiss-cpu (or use backend='torch')")
    if backend == "auto":
        return "faiss" if device.type == "cpu" and faiss_available() else "torch"
    return backend


def check_k(k: int, n_gallery: int, exclude_self: bool) -> int:
    limit = n_gallery - int(exclude_self)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError(f"k must be a positive integer, got {k!r}")
    if k > limit:
        what = "other items (leave-one-out)" if exclude_self else "gallery items"
        raise InputError(f"k={k} is larger than the {limit} {what}; use a smaller k")
    return int(k)


def knn(
    query: torch.Tensor,
    gallery: torch.Tensor | None = None,
    k: int = 1,
    *,
    distance: str = "cosine",
    backend: str = "auto",
    memory_budget: int | str = DEFAULT_MEMORY_BUDGET,
) -> Neighbors:
    """Exact k nearest gallery items of every query, ordered by (distance asc, index asc).

    ``gallery=None`` means leave-one-out: the query set is its own gallery and each query is excluded
    by index. Returns float32 ``distances [Q, k]`` and int64 ``indices [Q, k]`` on the query's device.
    """
    check_distance(distance)
    exclude_self = gallery is None
    g = query if exclude_self else gallery
    k = check_k(k, g.shape[0], exclude_self)
    budget = parse_memory_budget(memory_budget)
    q_op = score_operands(query, distance, "query")
    g_op = score_operands(g, distance, "gallery")
    backend = resolve_backend(backend, query.device)
    if backend == "faiss":
        values, indices = _knn_faiss(q_op, g_op, k, exclude_self, budget)
    elif exclude_self and distance == "cosine" and symmetric_block(query.shape[0], k, budget):
        values, indices = _knn_symmetric(q_op, k, symmetric_block(query.shape[0], k, budget))
    else:
        values, indices = _knn_chunked(q_op, g_op, k, exclude_self, budget)
    return Neighbors(scores_to_distances(values, query, distance), indices)


def symmetric_block(n: int, k: int, memory_budget: int) -> int:
    """Block size of the symmetric pass, or 0 when it does not apply: half the budget holds the
    running top-(k+1) of all n rows, the other half a few ``B x B`` blocks; needs at least 2 blocks."""
    half = memory_budget // 2
    if n * (k + 1) * 2 * 12 > half:
        return 0
    block = min(_SYMMETRIC_BLOCK, math.isqrt(half // (4 * _BYTES_PER_SCORE)))
    return block if n > block >= 16 else 0
