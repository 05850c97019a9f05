"""Choosing the distance threshold that decides "same item / class" for verification (``deepmetric match``).

Pairs come from a labelled calibration set: each of its items against every gallery item when the index
has labels (a pair with the same id, i.e. an item against itself, is left out), otherwise every pair
within the set. A pair is genuine when the labels agree. Accepting pairs with ``distance <= t``:

- ``precision``: the largest ``t`` whose accepted pairs are at least that precise (most recall);
- ``far``: the largest ``t`` whose false accept rate (impostor pairs accepted / impostor pairs) is at most
  ``far``; its true accept rate is reported as TAR (the ROC of :mod:`deepmetric.evaluation.verification`).

The stored threshold lies midway between the last accepted distance and the next larger one, so distances
recomputed with other rounding fall on the same side. Pairs beyond ``max_pairs`` are subsampled by query.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from deepmetric.errors import CalibrationError
from deepmetric.evaluation.verification import roc_curve
from deepmetric.product.index import SearchIndex, _operands
from deepmetric.product.store import Embeddings


def _distances(a: np.ndarray, b: np.ndarray, distance: str) -> torch.Tensor:
    qa, qb = torch.from_numpy(_operands(a, distance)), torch.from_numpy(_operands(b, distance))
    if distance == "cosine":
        return (1.0 - qa @ qb.T).clamp_min_(0.0)
    return torch.cdist(qa, qb, compute_mode="donot_use_mm_for_euclid_dist")


def _pairs(index: SearchIndex, labelled: Embeddings, max_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Distances and genuine flags of the calibration pairs, and how they were formed."""
    rng = np.random.default_rng(seed)
    q = np.arange(len(labelled))
    if index.labels is not None:
        if len(q) * len(index) > max_pairs:
            q = np.sort(rng.choice(q, max(1, max_pairs // len(index)), replace=False))
        dist = _distances(labelled.vectors[q], index.vectors, index.metadata["distance"])
        same = torch.from_numpy(labelled.labels[q][:, None] == index.labels[None, :])
        valid = torch.from_numpy(np.asarray(labelled.ids, dtype=str)[q][:, None] != np.asarray(index.ids, dtype=str)[None])
        how = "calibration set x gallery"
    else:
        if len(q) * (len(q) - 1) // 2 > max_pairs:
            q = np.sort(rng.choice(q, max(2, int(np.sqrt(2 * max_pairs))), replace=False))
        dist = _distances(labelled.vectors[q], labelled.vectors[q], index.metadata["distance"])
        same = torch.from_numpy(labelled.labels[q][:, None] == labelled.labels[q][None, :])
        valid = torch.ones_like(same).triu_(1)
        how = "pairs within the calibration set (the gallery has no labels)"
    return dist[valid].double().numpy(), same[valid].numpy(), how


def calibrate(index: SearchIndex, labelled: Embeddings, *, precision: float | None = None, far: float | None = None,
              max_pairs: int = 4_000_000, seed: int = 0, name: str | None = None) -> dict[str, Any]:
    """Choose the threshold for a target ``precision`` or ``far``, store it in ``index.metadata``
    (``threshold`` and ``calibration``) and return the calibration record."""
    if (precision is None) == (far is None):
        raise CalibrationError("give exactly one target: --precision P (e.g. 0.95) or --far F (e.g. 1e-3)")
    target = precision if precision is not None else far
    if not 0 < target <= 1:
        raise CalibrationError(f"the target must be in (0, 1], got {target}")
    if labelled.labels is None:
        raise CalibrationError(f"the calibration set{f' {name}' if name else ''} has no labels: embed a labelled "
                               "data set (e.g. `deepmetric embed RUN --data digits --split test --out FILE`)")
    if labelled.vectors.shape[1] != index.metadata["embedding_size"]:
        raise CalibrationError(f"the calibration embeddings have {labelled.vectors.shape[1]} dimensions, the index "
                               f"{index.metadata['embedding_size']}: embed them with the index's model")
    dist, same, how = _pairs(index, labelled, max_pairs, seed)
    n_pos, n_neg = int(same.sum()), int((~same).sum())
    if n_pos == 0 or n_neg == 0:
        raise CalibrationError(f"calibration needs genuine and impostor pairs; got {n_pos} genuine and {n_neg} "
                               "impostor pairs: use a set with several items per class and at least two classes")
    fpr, tpr, thresholds = roc_curve(-dist, same)  # score = -distance; thresholds from +inf (accept nothing) down
    accepted = -thresholds  # distance of the last accepted pair group at each ROC point
    tp, fp = tpr * n_pos, fpr * n_neg
    with np.errstate(invalid="ignore", divide="ignore"):
        prec = np.where(tp + fp > 0, tp / (tp + fp), np.nan)
    if precision is not None:
        ok = np.flatnonzero(prec >= precision)
        if ok.size == 0:
            best = int(np.nanargmax(prec))
            raise CalibrationError(f"no threshold reaches precision {precision}: the best is {prec[best]:.4f} (at "
                                   f"distance {accepted[best]:.4g}); lower --precision, or train a better model")
    else:
        if n_neg * far < 1:
            raise CalibrationError(f"FAR {far:g} needs at least {int(np.ceil(1 / far))} impostor pairs to be measured, "
                                   f"the calibration set gives {n_neg}: use a larger set or a larger --far")
        ok = np.flatnonzero((fpr <= far) & (np.arange(len(fpr)) > 0))
        if ok.size == 0:
            raise CalibrationError(f"no threshold keeps FAR at or below {far:g}: the closest pairs already include "
                                   f"{fpr[1] * n_neg:.0f} impostor pair(s) ({fpr[1]:.3g} of them); raise --far")
    j = int(ok[-1])
    threshold = float(accepted[j] if j + 1 == len(accepted) else (accepted[j] + accepted[j + 1]) / 2)
    record = {
        "threshold": threshold, "target": {"precision": precision} if precision is not None else {"far": far},
        "precision": float(prec[j]), "recall": float(tpr[j]), "far": float(fpr[j]),
        "pairs": int(len(dist)), "genuine_pairs": n_pos, "impostor_pairs": n_neg, "pairs_from": how,
        "set": name, "distance": index.metadata["distance"],
    }
    index.metadata["threshold"] = threshold
    index.metadata["calibration"] = record
    return record
