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
unless it fits in the budget.

**Backends.** ``torch``: chunked matrix product + ``topk``, on the input's device. ``faiss``: an exact
``IndexFlatIP`` on the same operands (on the GPU for CUDA inputs when faiss-gpu is installed, else on
the CPU); for CPU cosine leave-one-out it instead walks the upper triangle of ``B x B`` blocks of
``S = X X^T`` and feeds each block to faiss' top-k heaps of its rows and, through a threshold test,
of its columns, which halves the matrix-product work. ``auto`` = faiss on CPU when installed (its
heaps select faster than ``torch.topk`` there), torch otherwise.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from deepmetric import matmul
from deepmetric.errors import ConfigError, InputError, suggest

DISTANCES = ("cosine", "euclidean")
BACKENDS = ("auto", "torch", "faiss")
DEFAULT_MEMORY_BUDGET = 512 * 2**20
_BYTES_PER_SCORE = 12  # the float32 score plus room for top-k / sort workspaces
_SYMMETRIC_BLOCK = 2048  # < 2**15: tile columns are sorted as int16
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
    """Yield ``(start, scores[start:start + rows])``; in leave-one-out mode the self-score is ``-inf``.

    Every chunk is written into the same buffer (fresh multi-MB allocations cost page faults that can
    take longer than the product), so a yielded chunk is only valid until the next one.
    """
    buffer = torch.empty(min(rows, q_op.shape[0]), g_op.shape[0], device=q_op.device)
    for start in range(0, q_op.shape[0], rows):
        q = q_op[start : start + rows]
        s = torch.mm(q, g_op.T, out=buffer[: q.shape[0]])
        if exclude_self:
            s[:, start : start + s.shape[0]].diagonal().fill_(-torch.inf)
        yield start, s


def sort_by_key(values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order each row by (score descending, index ascending)."""
    order = indices.argsort(dim=1)
    values, indices = values.gather(1, order), indices.gather(1, order)
    order = values.argsort(dim=1, descending=True, stable=True)
    return values.gather(1, order), indices.gather(1, order)


def _new_heaps(n: int, kk: int):
    """faiss min-heaps keeping the kk largest scores of n rows (values and ids in numpy arrays)."""
    import faiss

    values, indices = np.empty((n, kk), np.float32), np.empty((n, kk), np.int64)
    heaps = faiss.float_minheap_array_t()
    heaps.nh, heaps.k = n, kk
    heaps.val, heaps.ids = faiss.swig_ptr(values), faiss.swig_ptr(indices)
    heaps.heapify()
    return heaps, values, indices


def _add(heaps, block: torch.Tensor, j0: int, i0: int) -> None:
    """Offer the contiguous CPU score ``block`` (rows i0.., gallery ids j0..) to the heaps."""
    import faiss

    heaps.addn(block.shape[1], faiss.swig_ptr(block.numpy()), j0, i0, block.shape[0])


def topk_scores(scores: torch.Tensor, k: int, heaps: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of each row under the (score desc, index asc) key, without a full sort.

    ``heaps=True`` selects with faiss' heaps (CPU; ~2.5x faster than ``torch.topk`` there)."""
    kk = min(k + 1, scores.shape[1])
    if heaps:
        h, v, i = _new_heaps(scores.shape[0], kk)
        _add(h, scores.contiguous(), 0, 0)
        h.reorder()
        values, indices = torch.from_numpy(v), torch.from_numpy(i)
    else:
        values, indices = scores.topk(kk, dim=1)
    values, indices = sort_by_key(values, indices)
    if kk > k:
        tied = (values[:, k - 1] == values[:, k]).nonzero().squeeze(1)
        if tied.numel():  # the k-th place is shared with items the selection may have dropped
            v, i = scores[tied].sort(dim=1, descending=True, stable=True)
            values[tied], indices[tied] = v[:, :kk], i[:, :kk]
    return values[:, :k], indices[:, :k]


def _knn_chunked(q_op, g_op, k, exclude_self, memory_budget):
    rows = chunk_rows(g_op.shape[0], memory_budget)
    parts = [topk_scores(s, k) for _, s in score_chunks(q_op, g_op, exclude_self=exclude_self, rows=rows)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _fix_boundary_ties(values, indices, k, q_op, g_op, exclude_self):
    """Recompute, by a full stable sort, the rows whose k-th and (k+1)-th scores tie."""
    if values.shape[1] > k:
        tied = (values[:, k - 1] == values[:, k]).nonzero().squeeze(1)
        if tied.numel():
            s = q_op[tied] @ g_op.T
            if exclude_self:
                s[torch.arange(tied.numel()), tied] = -torch.inf
            v, i = s.sort(dim=1, descending=True, stable=True)
            values[tied], indices[tied] = v[:, : values.shape[1]], i[:, : values.shape[1]]
    return values[:, :k], indices[:, :k]


def _knn_faiss_symmetric(x_op: torch.Tensor, k: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Leave-one-out top-k from the upper-triangular ``block x block`` tiles of ``S = X X^T``.

    Each tile ``S_IJ`` goes whole into the faiss min-heaps of rows I. Rows J need its transpose, but
    only the entries at or above their heap's current k-th best score can enter, so those are picked
    by a threshold test instead of transposing the tile; the diagonal tiles run first so that every
    heap has a threshold, and the picks of each tile row are pushed before the next. Heaps keep k + 1
    entries, so a tie at the k-th place is seen and that row re-sorted exactly. All products have the
    same shape (the last block zero-padded): BLAS may round a dot product differently in products of
    different shapes, which would split ties between exact duplicates. The tiles go through
    :func:`deepmetric.matmul.mm` where its oneDNN path is on (non-Intel x86-64; MKL runs AVX2 kernels there):
    like MKL's, its kernels round a dot product the same at every position of a tile and with the operands'
    roles swapped, which the duplicate-tie tests check on both paths.
    """
    import faiss

    n = x_op.shape[0]
    heaps, values, indices = _new_heaps(n, min(k + 1, n - 1))
    padded = torch.zeros(-(-n // block) * block, x_op.shape[1])
    padded[:n] = x_op
    buffer = None if matmul.ONEDNN else torch.empty(block, block)  # the oneDNN op has no `out=`
    starts = range(0, n, block)

    def tile(i0: int, j0: int) -> torch.Tensor:
        a, b = padded[i0 : i0 + block], padded[j0 : j0 + block].T
        out = matmul.mm(a, b) if buffer is None else torch.mm(a, b, out=buffer)
        ri, rj = min(block, n - i0), min(block, n - j0)
        return out if ri == rj == block else out[:ri, :rj].contiguous()

    for i0 in starts:
        s = tile(i0, i0)
        s.diagonal().fill_(-torch.inf)
        _add(heaps, s, i0, i0)
    thresholds = values[:, 0]  # the heap tops: k-th best score so far (a live view)
    for i0 in starts:
        picks = []
        for j0 in starts[starts.index(i0) + 1 :]:
            s = tile(i0, j0)
            _add(heaps, s, j0, i0)
            a = s.numpy()  # numpy compares and finds the few hits ~2x faster than torch here
            hits = np.flatnonzero(a >= np.ascontiguousarray(thresholds[j0 : j0 + a.shape[1]]))
            # grouped by tile column (numpy's stable sort of 16-bit keys is a radix sort), so the tiles'
            # picks, concatenated in column order, come sorted by receiving row with no global sort
            hits = hits[np.argsort((hits % a.shape[1]).astype(np.int16), kind="stable")]
            r, c = np.divmod(hits, a.shape[1])
            picks.append((torch.from_numpy(c + j0), torch.from_numpy(r + i0), torch.from_numpy(a.ravel()[hits])))
        if picks:  # row c + j0 receives column r + i0
            rows, cols, vals = (torch.cat(p) for p in zip(*picks))
            first = i0 + block
            rows -= first
            counts = torch.bincount(rows, minlength=n - first)
            slot = torch.arange(rows.numel()) - (counts.cumsum(0) - counts)[rows]
            width = max(int(counts.max()), 1)
            v = torch.full((n - first, width), -torch.inf)
            ids = torch.full((n - first, width), -1, dtype=torch.int64)
            v[rows, slot], ids[rows, slot] = vals, cols
            heaps.addn_with_ids(width, faiss.swig_ptr(v.numpy()), faiss.swig_ptr(ids.numpy()), width, first, n - first)
    heaps.reorder()
    v, i = sort_by_key(torch.from_numpy(values), torch.from_numpy(indices))
    return _fix_boundary_ties(v, i, k, x_op, x_op, True)


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _knn_faiss(q_op, g_op, k, exclude_self):
    """faiss ``IndexFlatIP`` on the score operands (faiss blocks the product itself, in bounded
    memory); the result is re-keyed and ties fixed by torch."""
    import faiss

    q_np = np.ascontiguousarray(q_op.cpu().numpy())
    g_np = np.ascontiguousarray(g_op.cpu().numpy())
    index = faiss.IndexFlatIP(g_np.shape[1])
    if q_op.is_cuda and faiss_gpus():  # faiss-gpu: the same exact flat index on the input's GPU
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), q_op.device.index or 0, index)
    index.add(g_np)
    n_g = g_np.shape[0]
    kk = min(k + 1 + int(exclude_self), n_g)  # one extra column to detect a tie at the k-th place
    v, i = (torch.from_numpy(a) for a in index.search(q_np, kk))
    if exclude_self:  # drop the query's own id; if it is not there, drop the last column
        rows = torch.arange(v.shape[0])
        is_self = i == rows.unsqueeze(1)
        drop = torch.where(is_self.any(1), is_self.int().argmax(1), kk - 1)
        keep = torch.ones_like(is_self)
        keep[rows, drop] = False
        v, i = v[keep].view(-1, kk - 1), i[keep].view(-1, kk - 1)
    values, indices = sort_by_key(v, i)
    return _fix_boundary_ties(values, indices, k, q_op.cpu(), g_op.cpu(), exclude_self)


def faiss_gpus() -> int:
    """Number of GPUs faiss can use (0 for faiss-cpu)."""
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


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
    on_cpu = query.device.type == "cpu"
    block = symmetric_block(query.shape[0], budget) if exclude_self and distance == "cosine" and on_cpu else 0
    if backend == "faiss" and block:
        values, indices = _knn_faiss_symmetric(q_op, k, block)
    elif backend == "faiss":
        values, indices = _knn_faiss(q_op, g_op, k, exclude_self)
    else:
        values, indices = _knn_chunked(q_op, g_op, k, exclude_self, budget)
    device = query.device
    return Neighbors(scores_to_distances(values.to(device), query, distance), indices.to(device))


def symmetric_block(n: int, memory_budget: int) -> int:
    """Block size B of the symmetric pass (two ``B x B`` float32 blocks within the budget), or 0 when
    there is a single block (nothing to share). Of the block sizes that need the fewest blocks, the
    smallest multiple of 16 is taken, so the zero-padded last block wastes little (20,000 items: 10 blocks
    of 2,000 instead of 2,048, 5 % fewer products)."""
    block = min(_SYMMETRIC_BLOCK, math.isqrt(memory_budget // (2 * 4)))
    if not n > block >= 16:
        return 0
    even = 16 * -(-n // (16 * -(-n // block)))  # ceil(n / number of blocks), rounded up to 16
    return even if even <= block else block
