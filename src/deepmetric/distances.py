"""Pairwise similarities and distances between embeddings.

``dist(x, y=None) -> [N, M]`` with ``y=None`` meaning ``y = x`` (one Gram product, whose backward is a
single matmul ``(G + Gᵀ) x`` instead of two). Half-precision inputs are computed in float32; float64 stays
float64. Registry keys: ``cosine`` (similarity: higher = closer), ``euclidean``, ``squared_euclidean``.

Euclidean distance is ``d = sqrt(max(d², eps))`` with ``d² = ‖a‖² + ‖b‖² − 2aᵀb`` clamped at 0, and
``d = 0`` (with zero gradient) where ``d² ≤ eps``: the gradient of ``sqrt`` is infinite at 0, so identical
points would otherwise give NaN.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from deepmetric.registry import Registry

DISTANCES: Registry[Distance] = Registry("distance")


class _Gram(torch.autograd.Function):
    """``x @ xᵀ`` with the backward ``(g + gᵀ) @ x`` (one matmul; autograd's default takes two)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x @ x.T

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return (grad + grad.T) @ x


def as_compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32 (losses and distances never compute in half precision)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def gram(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ yᵀ``; ``y=None`` uses the symmetric product with the one-matmul backward."""
    return _Gram.apply(x) if y is None else x @ y.T


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
        if self.normalize or self.is_similarity:
            x = F.normalize(x, dim=1)
            y = None if y is None else F.normalize(y, dim=1)
        if self.chunk_size is None or x.shape[0] <= self.chunk_size:
            return self._matrix(x, y)
        ref = x if y is None else y
        return torch.cat([self._matrix(c, ref) for c in x.split(self.chunk_size)])

    def dissimilarity(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The matrix oriented so that smaller = closer (similarities are negated)."""
        m = self(x, y)
        return -m if self.is_similarity else m

    def _matrix(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(normalize={self.normalize}, chunk_size={self.chunk_size})"


def _squared(x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    g = gram(x, y)
    if y is None:
        n = g.diagonal()
        return (n[:, None] + n[None, :] - 2 * g).clamp_(min=0)
    return ((x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * g).clamp_(min=0)


@DISTANCES.register("cosine")
class CosineSimilarity(Distance):
    """Cosine similarity ``s_ij = x̂_iᵀ ŷ_j`` with ``x̂ = x/‖x‖`` (a similarity: higher = closer)."""

    is_similarity = True

    def __init__(self, chunk_size: int | None = None):
        super().__init__(normalize=True, chunk_size=chunk_size)

    def _matrix(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return gram(x, y)


@DISTANCES.register("squared_euclidean")
class SquaredEuclidean(Distance):
    """``d²_ij = ‖x_i − y_j‖²`` via ``‖x‖² + ‖y‖² − 2xᵀy``, clamped at 0."""

    def _matrix(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return _squared(x, y)


@DISTANCES.register("euclidean")
class Euclidean(Distance):
    """``d_ij = ‖x_i − y_j‖``, computed as ``sqrt(max(d², eps))`` and set to 0 where ``d² ≤ eps``."""

    def __init__(self, normalize: bool = False, chunk_size: int | None = None, eps: float = 1e-8):
        super().__init__(normalize=normalize, chunk_size=chunk_size)
        self.eps = eps

    def _matrix(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        d2 = _squared(x, y)
        return d2.clamp(min=self.eps).sqrt().masked_fill(d2 <= self.eps, 0.0)


def build(name: str, **kwargs: Any) -> Distance:
    """Construct the distance registered as ``name`` (``cosine``, ``euclidean``, ``squared_euclidean``)."""
    return DISTANCES.build(name, **kwargs)


def available() -> list[str]:
    """Registry keys of all distances."""
    return DISTANCES.available()
