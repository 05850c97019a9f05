"""Pairwise similarities and distances between embeddings.

``dist(x, y=None) -> [N, M]`` with ``y=None`` meaning ``y = x`` (one Gram product, whose backward is a
single matmul ``(G + Gᵀ) x`` instead of two). Half-precision inputs are computed in float32; float64 stays
float64. Registry keys: ``cosine`` (similarity: higher = closer), ``euclidean``, ``squared_euclidean``.

Euclidean distances come from ``d² = ‖a‖² + ‖b‖² − 2aᵀb`` (one GEMM, updated in place), with
``d² ≤ eps`` set to 0 and a hand-written backward in which ``d = sqrt(d²)`` has zero gradient at
``d = 0``: the gradient of ``sqrt`` is infinite at 0, so identical points would otherwise give NaN.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from deepmetric.matmul import mm
from deepmetric.registry import Registry

DISTANCES: Registry[Distance] = Registry("distance")


def _symmetrized(g: torch.Tensor) -> torch.Tensor:
    """``g + gᵀ``; the transposing copy + add is ~3x faster than ``g + g.T`` on CPU."""
    return g.T.contiguous().add_(g)


class _Gram(torch.autograd.Function):
    """``x @ xᵀ`` with the backward ``(g + gᵀ) @ x`` (autograd's default would be two full products
    plus an accumulation)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return mm(x, x.T)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return mm(_symmetrized(grad), x)


def _euclidean_matrix(x: torch.Tensor, y: torch.Tensor | None, root: bool, eps: float) -> torch.Tensor:
    """The forward of :class:`_PairwiseEuclidean`."""
    ref = x if y is None else y
    nx = (x * x).sum(1)
    ny = nx if y is None else (ref * ref).sum(1)
    d = mm(x, ref.T)
    d = torch.add(nx[:, None], d, alpha=-2.0, out=d).add_(ny[None, :])
    F.threshold(d, eps, 0.0, inplace=True)
    return d.sqrt_() if root else d


def _euclidean_matrix_backward(grad, x, y, d, root: bool, needs: tuple[bool, bool]):
    """The backward of :class:`_PairwiseEuclidean`: ``(∂x, ∂y)`` (``∂y`` None when ``y`` is None)."""
    # g = (2 / scale) ∂L/∂d², so that ∂L/∂x_i = scale · Σ_j g_ij (x_i − y_j)
    if root:  # ∂d/∂d² = 1/(2d), 0 at d = 0
        g, scale = torch.reciprocal(d).nan_to_num_(posinf=0.0).mul_(grad), 1.0
    else:
        g, scale = grad, 2.0
    if y is None:  # Σ_j s_ij (x_i − x_j) with s = g + gᵀ: one GEMM with the row sums on the diagonal
        s = _symmetrized(g)
        s.diagonal().sub_(s.sum(1))
        return mm(s, x).mul_(-scale), None
    gx = scale * (g.sum(1)[:, None] * x - mm(g, y)) if needs[0] else None
    gy = scale * (g.sum(0)[:, None] * y - mm(g.T, x)) if needs[1] else None
    return gx, gy


class _PairwiseEuclidean(torch.autograd.Function):
    """``d²_ij = ‖x_i − y_j‖²`` (``root=False``) or ``d_ij`` (``root=True``) in place on the Gram
    product, with a hand-written backward: ``∂d²/∂x_i = 2(x_i − y_j)``; for ``d`` the gradient is
    ``1/(2d)`` of that where ``d > 0`` and 0 where ``d = 0``. ``y=None`` means ``y = x``.
    Values with ``d² ≤ eps`` are set to exactly 0 (identical points, rounding noise)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor | None, root: bool, eps: float) -> torch.Tensor:
        d = _euclidean_matrix(x, y, root, eps)
        ctx.root = root
        ctx.save_for_backward(x, y, d)
        return d

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, y, d = ctx.saved_tensors
        return *_euclidean_matrix_backward(grad, x, y, d, ctx.root, ctx.needs_input_grad[:2]), None, None


class _UnitEuclidean(torch.autograd.Function):
    """:func:`normalize` of both inputs, then :class:`_PairwiseEuclidean`, as one node: the same
    operations, so the same values, without two of the three autograd nodes. At B = 128 the nodes' own
    Python work was a third of the matrix's forward + backward on CPU."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor | None, root: bool, eps: float) -> torch.Tensor:
        xn = unit_rows(x)
        yn = None if y is None else unit_rows(y)
        d = _euclidean_matrix(xn[0], None if y is None else yn[0], root, eps)
        ctx.root = root
        ctx.save_for_backward(d, *xn, *(yn or (None, None, None)))
        return d

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        d, xh, x_den, x_un, yh, y_den, y_un = ctx.saved_tensors
        needs = ctx.needs_input_grad[:2]
        g_xh, g_yh = _euclidean_matrix_backward(grad, xh, yh, d, ctx.root, needs)
        gx = unit_rows_backward(g_xh, xh, x_den, x_un) if g_xh is not None else None
        gy = unit_rows_backward(g_yh, yh, y_den, y_un) if g_yh is not None else None
        return gx, gy, None, None


class _PairedEuclidean(torch.autograd.Function):
    """``d²(x_i, y_j)`` (or ``d``) for listed pairs ``(i[t], j[t])`` only, by the formula of
    :class:`_PairwiseEuclidean` (``‖x_i‖² − 2 x_iᵀy_j + ‖y_j‖²``, ``d² ≤ eps`` set to 0; for ``d`` zero gradient
    at 0); O(T·D) instead of the O(N·M·D) matrix. ``y=None`` means ``y = x``."""

    @staticmethod
    def forward(ctx, x, y, i, j, root: bool, eps: float):
        ref = x if y is None else y
        nx = (x * x).sum(1)
        ny = nx if y is None else (ref * ref).sum(1)
        xi, yj = x.index_select(0, i), ref.index_select(0, j)  # index_select: ~3x faster than x[i] on CPU
        d = torch.add(nx.index_select(0, i), torch.linalg.vecdot(xi, yj), alpha=-2.0).add_(ny.index_select(0, j))
        F.threshold(d, eps, 0.0, inplace=True)
        if root:
            d.sqrt_()
        ctx.root = root
        ctx.save_for_backward(x, y, i, j, xi, yj, d)
        return d

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, y, i, j, xi, yj, d = ctx.saved_tensors
        if ctx.root:  # ∂d/∂x_i = (x_i − y_j)/d, 0 at d = 0
            g = torch.reciprocal(d).nan_to_num_(posinf=0.0).mul_(grad)
        else:  # ∂d²/∂x_i = 2 (x_i − y_j)
            g = grad * 2.0
        diff = (xi - yj).mul_(g[:, None])
        gx = torch.zeros_like(x).index_add_(0, i, diff)
        if y is None:
            return gx.index_add_(0, j, diff, alpha=-1), None, None, None, None, None
        gy = torch.zeros_like(y).index_add_(0, j, diff, alpha=-1) if ctx.needs_input_grad[1] else None
        return gx if ctx.needs_input_grad[0] else None, gy, None, None, None, None


def unit_rows(x: torch.Tensor, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row normalisation for a hand-written node: ``(x̂, max(‖x‖, eps), 1 where ‖x‖ ≥ eps)`` (the last two
    as column vectors), what :func:`unit_rows_backward` needs."""
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    denom = norm.clamp_min(eps)
    return x / denom, denom, (norm >= eps).to(x.dtype)


def unit_rows_backward(grad, y, denom, unclamped) -> torch.Tensor:
    """``(g − x̂ (g·x̂)) / max(‖x‖, eps)``: the gradient through :func:`unit_rows` (``y`` = x̂), the projection
    dropped where the norm was clamped, as autograd does; ``grad`` is not modified."""
    return torch.addcmul(grad, y, torch.linalg.vecdot(grad, y)[:, None].mul_(unclamped), value=-1).div_(denom)


class _Normalize(torch.autograd.Function):
    """``F.normalize(x, dim=1)``, i.e. ``x̂ = x / max(‖x‖, eps)`` per row (the same values), with the backward
    ``(g − x̂ (g·x̂)) / max(‖x‖, eps)`` (the projection dropped where the norm was clamped, as autograd does)
    as one node of four operations instead of autograd's chain of norm, clamp, expand and division."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float) -> torch.Tensor:
        y, denom, unclamped = unit_rows(x, eps)
        ctx.save_for_backward(y, denom, unclamped)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        return unit_rows_backward(grad, *ctx.saved_tensors), None


def normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows scaled to unit L2 norm, as ``F.normalize(x, dim=1, eps=eps)`` (faster backward)."""
    return _Normalize.apply(x, eps)


def full_precision(device_type: str) -> contextlib.AbstractContextManager:
    """A context with autocast disabled on ``device_type``; a no-op context when autocast is not enabled
    there (entering and leaving ``torch.autocast`` costs more than a small loss's arithmetic)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def as_compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32 (losses and distances never compute in half precision)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def gram(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ yᵀ``; ``y=None`` uses the symmetric product with the one-matmul backward."""
    return _Gram.apply(x) if y is None else mm(x, y.T)


class Distance:
    """Base class. ``is_similarity`` says whether larger values mean closer (cosine) or farther.

    Args:
        normalize: L2-normalise both inputs first (cosine always does).
        chunk_size: if set, compute ``chunk_size`` rows of the result at a time, which bounds the
            temporaries of large no-grad calls (miners, evaluation); the result is the same.
    """

    is_similarity = False

    def __init__(self, normalize: bool = False, chunk_size: int | None = None):
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size}")
        self.normalize = normalize
        self.chunk_size = chunk_size

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        x = as_compute_dtype(x)
        y = None if y is None else as_compute_dtype(y)
        unit = self.normalize or self.is_similarity
        if self.chunk_size is None or x.shape[0] <= self.chunk_size:
            return self._unit_matrix(x, y) if unit else self._matrix(x, y)
        if unit:
            x = normalize(x)
            y = None if y is None else normalize(y)
        ref = x if y is None else y
        return torch.cat([self._matrix(c, ref) for c in x.split(self.chunk_size)])

    def dissimilarity(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The matrix oriented so that smaller = closer (similarities are negated)."""
        m = self(x, y)
        return -m if self.is_similarity else m

    def paired_dissimilarity(
        self, x: torch.Tensor, i: torch.Tensor, j: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``dissimilarity(x, y)[i, j]`` for index vectors ``i``, ``j`` without building the matrix: the same
        formula on the listed pairs only (dot products taken row by row, so a value can differ from the
        matrix entry in the last bits)."""
        x = as_compute_dtype(x)
        y = None if y is None else as_compute_dtype(y)
        if self.normalize or self.is_similarity:
            x = normalize(x)
            y = None if y is None else normalize(y)
        d = self._paired(x, y, i, j)
        return -d if self.is_similarity else d

    def _matrix(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _unit_matrix(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """:meth:`_matrix` of the L2-normalised inputs (a subclass may do both in one node)."""
        return self._matrix(normalize(x), None if y is None else normalize(y))

    def _paired(self, x: torch.Tensor, y: torch.Tensor | None, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(normalize={self.normalize}, chunk_size={self.chunk_size})"


@DISTANCES.register("cosine")
class CosineSimilarity(Distance):
    """Cosine similarity ``s_ij = x̂_iᵀ ŷ_j`` with ``x̂ = x/‖x‖`` (a similarity: higher = closer)."""

    is_similarity = True

    def __init__(self, chunk_size: int | None = None):
        super().__init__(normalize=True, chunk_size=chunk_size)

    def _matrix(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return gram(x, y)

    def _paired(self, x: torch.Tensor, y: torch.Tensor | None, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vecdot(x[i], (x if y is None else y)[j])


@DISTANCES.register("squared_euclidean")
class SquaredEuclidean(Distance):
    """``d²_ij = ‖x_i − y_j‖²`` via ``‖x‖² + ‖y‖² − 2xᵀy``; values ≤ ``eps`` (rounding noise) are 0."""

    root = False  # d² (Euclidean: d)

    def __init__(self, normalize: bool = False, chunk_size: int | None = None, eps: float = 1e-8):
        super().__init__(normalize=normalize, chunk_size=chunk_size)
        self.eps = eps

    def _matrix(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return _PairwiseEuclidean.apply(x, y, self.root, self.eps)

    def _unit_matrix(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return _UnitEuclidean.apply(x, y, self.root, self.eps)  # normalisation + matrix in one node

    def _paired(self, x: torch.Tensor, y: torch.Tensor | None, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return _PairedEuclidean.apply(x, y, i, j, self.root, self.eps)


@DISTANCES.register("euclidean")
class Euclidean(SquaredEuclidean):
    """``d_ij = ‖x_i − y_j‖ = sqrt(d²)``, exactly 0 with zero gradient where ``d² ≤ eps`` (so identical
    points give no NaN)."""

    root = True


def build(name: str, **kwargs: Any) -> Distance:
    """Construct the distance registered as ``name`` (``cosine``, ``euclidean``, ``squared_euclidean``)."""
    return DISTANCES.build(name, **kwargs)


def available() -> list[str]:
    """Registry keys of all distances."""
    return DISTANCES.available()
