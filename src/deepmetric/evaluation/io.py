"""Files in, table and JSON out: what ``deepmetric evaluate`` uses around :func:`evaluate`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from deepmetric.errors import DataError, InputError
from deepmetric.evaluation.api import evaluate

SUFFIXES = (".npy", ".npz", ".pt", ".pth")


def _single(arrays: dict, path: Path, key: str | None):
    if key is not None:
        if key not in arrays:
            raise DataError(f"{path} has no array {key!r}; it holds {sorted(arrays)}")
        return arrays[key]
    if len(arrays) != 1:
        raise DataError(f"{path} holds {sorted(arrays)}; name one with key=... (or path.npz:key on the CLI)")
    return next(iter(arrays.values()))


def load_array(path, key: str | None = None) -> np.ndarray:
    """An array from ``.npy``, ``.npz`` or ``.pt``/``.pth`` (a tensor, or a dict of tensors with
    ``key``); a ``path:key`` suffix also names the entry. bfloat16 and GPU tensors come back as
    float32 numpy on the CPU."""
    path_str = str(path)
    if key is None and ":" in Path(path_str).name:
        path_str, key = path_str.rsplit(":", 1)
    path = Path(path_str)
    if path.suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {SUFFIXES}")
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return np.asarray(_single(dict(z), path, key))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        obj = _single(obj, path, key)
    if isinstance(obj, (list, tuple)):
        obj = torch.as_tensor(obj)
    if not isinstance(obj, torch.Tensor):
        raise DataError(f"{path} holds a {type(obj).__name__}, not a tensor")
    if obj.dtype == torch.bfloat16:
        obj = obj.float()
    return obj.numpy()


def evaluate_files(
    embeddings_path, labels_path, query_embeddings_path=None, query_labels_path=None, **kwargs
) -> dict[str, float]:
    """:func:`evaluate` on arrays loaded with :func:`load_array` (leave-one-out without query paths)."""
    if (query_embeddings_path is None) != (query_labels_path is None):
        raise InputError("give both query_embeddings_path and query_labels_path, or neither (leave-one-out)")
    query = {}
    if query_embeddings_path is not None:
        query = {
            "query_embeddings": load_array(query_embeddings_path),
            "query_labels": load_array(query_labels_path),
        }
    return evaluate(load_array(embeddings_path), load_array(labels_path), **query, **kwargs)


def format_table(results: dict[str, float], digits: int = 4) -> str:
    """A plain two-column text table, one metric per row."""
    rows = [(k, str(v) if isinstance(v, (int, np.integer)) else f"{v:.{digits}f}") for k, v in results.items()]
    width = max([len("metric"), *(len(k) for k, _ in rows)])
    vwidth = max([len("value"), *(len(v) for _, v in rows)])
    lines = [f"{'metric':<{width}}  {'value':>{vwidth}}", f"{'-' * width}  {'-' * vwidth}"]
    lines += [f"{k:<{width}}  {v:>{vwidth}}" for k, v in rows]
    return "\n".join(lines)


def write_json(results: dict[str, float], path) -> Path:
    """Write results as JSON (NaN becomes null, so the file is strict JSON)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in results.items()}
    path.write_text(json.dumps(clean, indent=2) + "\n")
    return path
