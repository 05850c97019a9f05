"""Input checks shared by losses, miners and metrics: clear errors instead of silent NaNs."""

from __future__ import annotations

import math

import numpy as np
import torch

from deepmetric.errors import InputError, LabelError


def check_embeddings(x: torch.Tensor, name: str = "embeddings") -> torch.Tensor:
    """Require a finite floating-point ``[N, D]`` tensor."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise InputError(f"{name} must have shape [N, D], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise InputError(f"{name} must be floating point, got {x.dtype}")
    if not math.isfinite(x.detach().sum()) and not bool(torch.isfinite(x).all()):  # a finite sum: all finite
        bad = int((~torch.isfinite(x)).any(dim=1).sum())
        raise InputError(
            f"{name} contain NaN or Inf in {bad} of {x.shape[0]} rows; "
            "check the model output (learning rate too high? mixed precision overflow?)"
        )
    return x


def check_labels(labels: torch.Tensor, n: int, name: str = "labels") -> torch.Tensor:
    """Require a 1-D integer tensor of length ``n``."""
    if not isinstance(labels, torch.Tensor):
        raise LabelError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.ndim != 1:
        raise LabelError(f"{name} must have shape [N], got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise LabelError(f"{name} must be integers (class ids), got {labels.dtype}")
    if labels.shape[0] != n:
        raise LabelError(f"{name} has {labels.shape[0]} entries but there are {n} embeddings")
    return labels


def check_pair(embeddings: torch.Tensor, labels: torch.Tensor, prefix: str = "") -> None:
    """Check embeddings ``[N, D]`` and matching integer labels ``[N]``."""
    check_embeddings(embeddings, f"{prefix}embeddings")
    check_labels(labels, embeddings.shape[0], f"{prefix}labels")


def as_int_labels(labels, name: str = "labels") -> np.ndarray:
    """Convert array-like labels to ``int64`` numpy, refusing non-integer values (e.g. 1.5, 'cat')."""
    arr = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if arr.ndim != 1:
        raise LabelError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64, copy=False)
    if arr.dtype.kind == "f" and arr.size and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
        return arr.astype(np.int64)
    raise LabelError(
        f"{name} must be integer class ids, got dtype {arr.dtype}"
        + (f" (e.g. {arr.flat[0]!r})" if arr.size else "")
        + "; map class names to integers first"
    )
