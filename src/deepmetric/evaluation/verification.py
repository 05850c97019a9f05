"""Pair verification metrics: is a pair (a, b) the same identity? Higher score = more similar.

Every metric works on the ROC over the *distinct* score thresholds (equal scores form one threshold;
a pair is accepted when ``score >= t``):

- ``roc_auc``: area under the ROC = P(score of a genuine pair > score of an impostor) with ties
  counting 1/2 (Mann-Whitney U from average ranks); equals sklearn's ``roc_auc_score``.
- ``best_threshold_accuracy``: the highest ``(TP + TN) / n`` over all thresholds, and its threshold.
- ``kfold_accuracy``: the LFW protocol: for each of ``n_folds`` contiguous folds, the threshold that is
  best on the other folds scores the held-out fold; mean and std over folds.
- ``tar_at_far``: TAR at a false accept rate, linearly interpolated on the ROC's upper envelope; NaN (with a warning)
  when there are fewer than 1/FAR impostor pairs, as the rate is not measurable (IJB-B/C style).
- ``pair_average_precision``: AUPRC = sum_n (R_n - R_{n-1}) P_n over thresholds, as sklearn's
  ``average_precision_score``.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy.stats import rankdata

from deepmetric.errors import InputError
from deepmetric.evaluation.knn import check_distance


def _pairs(scores, same) -> tuple[np.ndarray, np.ndarray]:
    s = scores.detach().cpu().double().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores, float)
    y = same.detach().cpu().numpy() if isinstance(same, torch.Tensor) else np.asarray(same)
    if s.ndim != 1 or y.ndim != 1 or s.shape != y.shape:
        raise InputError(f"scores and same must be 1-D of equal length, got {s.shape} and {y.shape}")
    if not np.all(np.isfinite(s)):
        raise InputError("scores contain NaN or Inf")
    if not np.isin(y, (0, 1)).all():
        raise InputError("same must be binary (1 = genuine pair, 0 = impostor pair)")
    y = y.astype(bool)
    if y.all() or not y.any():
        raise InputError("verification metrics need both genuine (same=1) and impostor (same=0) pairs")
    return s, y


def roc_curve(scores, same) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` from the strictest threshold (+inf: accept nothing) down."""
    s, y = _pairs(scores, same)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[s[1:] != s[:-1], True]  # last pair of each run of equal scores
    tps, fps = np.cumsum(y)[last], np.cumsum(~y)[last]
    return np.r_[0, fps] / fps[-1], np.r_[0, tps] / tps[-1], np.r_[np.inf, s[last]]


def roc_auc(scores, same) -> float:
    s, y = _pairs(scores, same)
    ranks = rankdata(s)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _accuracies(fpr, tpr, n_pos, n_neg):
    return (tpr * n_pos + (1 - fpr) * n_neg) / (n_pos + n_neg)


def best_threshold_accuracy(scores, same) -> tuple[float, float]:
    """``(accuracy, threshold)``: accept pairs with ``score >= threshold``."""
    s, y = _pairs(scores, same)
    fpr, tpr, thresholds = roc_curve(s, y)
    acc = _accuracies(fpr, tpr, int(y.sum()), int((~y).sum()))
    best = int(np.argmax(acc))
    return float(acc[best]), float(thresholds[best])


def kfold_accuracy(scores, same, n_folds: int = 10) -> tuple[float, float]:
    """LFW-style ``(mean, std)`` accuracy over contiguous folds, each scored at the others' best threshold."""
    s, y = _pairs(scores, same)
    if not 2 <= n_folds <= len(s):
        raise InputError(f"n_folds must be between 2 and the number of pairs ({len(s)}), got {n_folds}")
    folds = np.array_split(np.arange(len(s)), n_folds)
    accs = []
    for fold in folds:
        train = np.setdiff1d(np.arange(len(s)), fold)
        _, threshold = best_threshold_accuracy(s[train], y[train])
        accs.append(float(((s[fold] >= threshold) == y[fold]).mean()))
    return float(np.mean(accs)), float(np.std(accs))


def tar_at_far(scores, same, far: float) -> float:
    """True accept rate at false accept rate ``far``, interpolated on the ROC."""
    s, y = _pairs(scores, same)
    n_neg = int((~y).sum())
    if not 0 < far <= 1:
        raise InputError(f"far must be in (0, 1], got {far}")
    if n_neg * far < 1:
        warnings.warn(
            f"TAR@FAR={far:g} needs at least {int(np.ceil(1 / far))} impostor pairs, got {n_neg}; returning NaN",
            RuntimeWarning,
            stacklevel=2,
        )
        return float("nan")
    fpr, tpr, _ = roc_curve(s, y)
    top = np.r_[fpr[1:] != fpr[:-1], True]  # the highest TAR at each FAR (vertical ROC steps)
    return float(np.interp(far, fpr[top], tpr[top]))


def pair_average_precision(scores, same) -> float:
    s, y = _pairs(scores, same)
    fpr, tpr, _ = roc_curve(s, y)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    tp, fp = tpr[1:] * n_pos, fpr[1:] * n_neg
    return float(np.sum(np.diff(tpr) * tp / (tp + fp)))


def pair_scores(a, b, distance: str = "cosine") -> torch.Tensor:
    """Similarity of row i of ``a`` with row i of ``b``: cosine, or minus the Euclidean distance."""
    check_distance(distance)
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    if a.shape != b.shape or a.ndim != 2:
        raise InputError(f"pair embeddings must both be [P, D], got {tuple(a.shape)} and {tuple(b.shape)}")
    if distance == "cosine":
        return torch.nn.functional.cosine_similarity(a, b, dim=1)
    return -(a - b).norm(dim=1)


def verification_metrics(
    a, b, same, *, distance: str = "cosine", fars=(1e-4, 1e-3, 1e-2), n_folds: int = 10
) -> dict[str, float]:
    """All pair metrics for embeddings ``a[i]``, ``b[i]`` of pair i; keys ``roc_auc``, ``accuracy``,
    ``threshold``, ``kfold_accuracy``, ``kfold_accuracy_std``, ``auprc`` and ``tar@far=<far>``."""
    s = pair_scores(a, b, distance).double().cpu().numpy()
    accuracy, threshold = best_threshold_accuracy(s, same)
    mean, std = kfold_accuracy(s, same, n_folds)
    out = {"roc_auc": roc_auc(s, same), "accuracy": accuracy, "threshold": threshold}
    out.update({"kfold_accuracy": mean, "kfold_accuracy_std": std, "auprc": pair_average_precision(s, same)})
    out.update({f"tar@far={far:g}": tar_at_far(s, same, far) for far in fars})
    return out
