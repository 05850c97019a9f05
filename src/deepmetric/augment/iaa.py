"""IAA: intra-class adaptive augmentation with neighbour correction (Fu, Mao, Hu, Liu & Zhang, IEEE TMM 2022,
arXiv 2211.16264; ``darkpromise98/IAA``)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from deepmetric.augment import Augmented, Augmenter, check_class_batch, copies_rule, maybe_normalize, register
from deepmetric.distances import as_compute_dtype
from deepmetric.errors import ConfigError

if TYPE_CHECKING:
    from deepmetric.hooks import TrainerView


def class_moments(x: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, ...]:
    """Per-class count ``[C]``, mean and population (diagonal) variance ``[C, D]``; zeros for absent classes."""
    n = torch.bincount(labels, minlength=num_classes).to(x.dtype)
    mean = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, labels, x)
    mean = mean / n.clamp(min=1)[:, None]
    sq = torch.zeros_like(mean).index_add_(0, labels, (x - mean[labels]) ** 2)
    return n, mean, sq / n.clamp(min=1)[:, None]


def merge_moments(mean: torch.Tensor, var: torch.Tensor, amount: torch.Tensor, n_new: torch.Tensor,
                  mean_new: torch.Tensor, var_new: torch.Tensor, min_weight: float = 0.0) -> tuple[torch.Tensor, ...]:
    """IAA's (and ISDA's) running estimate: with ``w = n'/(n + n')`` clamped to ``≥ min_weight`` (0 where n' = 0),
    ``σ² ← (1 − w)σ² + wσ'² + w(1 − w)(μ − μ')²``, ``μ ← (1 − w)μ + wμ'``, ``n ← n + n'``. With
    ``min_weight = 0`` this is the exact pooled mean and variance of the two sets."""
    w = torch.where(n_new > 0, (n_new / (n_new + amount).clamp(min=1)).clamp(min=min_weight), 0.0)[:, None]
    var = (1 - w) * var + w * var_new + w * (1 - w) * (mean - mean_new) ** 2
    return (1 - w) * mean + w * mean_new, var, amount + n_new


def _minmax(d: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-row min-max normalisation over the valid entries (0 where a row's valid entries are all equal)."""
    lo = d.masked_fill(~valid, math.inf).amin(1, keepdim=True)
    hi = d.masked_fill(~valid, -math.inf).amax(1, keepdim=True)
    return ((d - lo) / (hi - lo).clamp(min=torch.finfo(d.dtype).tiny)).masked_fill(~valid, 0.0)


def neighbour_variance(mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor, k: int,
                       chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """IAA's neighbour statistics (eq. 11-14): ``(Σ_nb [C, D], Σ_g [D])``.

    ``Σ_g = Σ_c n_c σ²_c / Σ_c n_c`` over classes with more than one sample; the neighbours N_c of class c are
    the k classes (with more than one sample, c excluded) minimising ``‖μ_i² − μ_c²‖`` (element-wise squared
    means), weighted ``w_i = n_i·exp(−d̂_m²/2 − d̂_cv²/2)`` with ``d_cv = ‖σ²_i − σ²_c‖`` and both distances
    min-max normalised over the row's candidates; ``Σ_nb_c = Σ_i w_i σ²_i / Σ_i w_i``. Rows are processed in
    chunks, so memory is O(chunk · C).
    """
    c = mean.shape[0]
    usable = count > 1
    glob = (var[usable] * count[usable, None]).sum(0) / count[usable].sum().clamp(min=1)
    k = min(k, int(usable.sum()))
    nb = torch.zeros_like(var)
    if k == 0:
        return nb, glob
    m2 = mean**2
    cols = torch.arange(c, device=mean.device)
    for start in range(0, c, chunk):
        rows = cols[start : start + chunk]
        cand = usable[None, :] & (cols[None, :] != rows[:, None])
        d_mean = torch.cdist(m2[rows], m2)
        d_var = torch.cdist(var[rows], var)
        idx = d_mean.masked_fill(~cand, math.inf).topk(k, dim=1, largest=False).indices
        dm, dv = _minmax(d_mean, cand).gather(1, idx), _minmax(d_var, cand).gather(1, idx)
        w = count[idx] * torch.exp(-(dm**2) / 2 - dv**2 / 2) * cand.gather(1, idx).to(var.dtype)
        nb[rows] = (w[:, :, None] * var[idx]).sum(1) / w.sum(1, keepdim=True).clamp(min=torch.finfo(var.dtype).tiny)
    return nb, glob


def correction_weight(count: torch.Tensor, beta: float = 0.1, few_shot: int = 40) -> torch.Tensor:
    """IAA's mixing weight ``α_c = 1/(1 + log(1 + β(n_c − 1)))`` for ``n_c ≤ few_shot``, else 0 (eq. 15)."""
    n = count.clamp(min=1)
    return (1.0 / (1.0 + torch.log1p(beta * (n - 1)))) * (n <= few_shot).to(count.dtype)


@register("iaa")
class IntraClassAdaptiveAugmentation(Augmenter):
    """IAA: synthetic samples from per-class variation estimates, corrected from similar classes.

    **Estimation** (before the first synthesis and every ``every`` epochs after ``start_epoch``; a pass in
    eval mode over the training split): per class the count n', mean μ' and diagonal population variance σ'²
    of the **pre-normalisation** embeddings are merged into the running estimate by :func:`merge_moments`
    (w clamped to ≥ 0.8, as the code's ``momentum``). **Neighbour correction** (for classes with few samples,
    eq. 11-16): ``Σ_c ← (1 − α_c) σ²_c + α_c ((1 − γ) Σ_nb_c + γ Σ_g)`` with :func:`neighbour_variance`
    (25 neighbours), :func:`correction_weight` (β = 0.1; α = 0 above 40 samples, so CUB/Cars are unaffected)
    and γ = 0.1.

    **Generation** (every step, once estimates exist): ``ẑ_i^m = z_i + √λ·σ_{y_i} ⊙ ε``, ε ~ N(0, I),
    m = 1..M, from the pre-normalisation ``z`` (``raw``), L2-normalised when the head normalises; appended
    copy-major. **Anchors are real rows only**; the synthetic rows are extra candidates of the loss's (and
    miner's) positives and negatives, except that an anchor's own copies are not its positives (the code's
    ``pos_neg_mask_xy``; see :mod:`deepmetric.pairing`).

    Defaults: M = 3 (``num_copies``; 2 for contrastive on SOP/In-Shop), λ = 0.8 (CUB/Cars; 0.5-0.6 on
    SOP/In-Shop), estimates every 4 epochs (paper; the code uses 2), ``start_epoch`` 0 (the code: 30).
    ``public_code=True`` reproduces the public code instead of the paper: no neighbour correction (the code
    computes it but never calls ``distribution_calibration``), copy m uses ``var^(1/2^m)`` (``sqrt`` is
    re-applied inside the loop) and λ is scaled by 1, .9, .75, .6 after 40, 60 and 80% of the epochs.
    ``num_copies=0`` is the identity.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        num_copies: int = 3,
        lam: float = 0.8,
        every: int = 4,
        start_epoch: int = 0,
        min_weight: float = 0.8,
        neighbours: int = 25,
        beta: float = 0.1,
        gamma: float = 0.1,
        few_shot: int = 40,
        normalize: bool = True,
        public_code: bool = False,
    ):
        super().__init__()
        if num_copies < 0 or lam < 0 or every < 1 or start_epoch < 0 or neighbours < 1:
            raise ConfigError(f"iaa: need num_copies >= 0, lam >= 0, every >= 1, start_epoch >= 0 and neighbours >= 1; "
                              f"got {num_copies}, {lam}, {every}, {start_epoch}, {neighbours}")
        if not 0 <= min_weight <= 1 or not 0 <= gamma <= 1:
            raise ConfigError(f"iaa: min_weight and gamma must lie in [0, 1], got {min_weight}, {gamma}")
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.num_copies, self.lam, self.every, self.start_epoch = num_copies, float(lam), every, start_epoch
        self.min_weight, self.neighbours, self.beta, self.gamma, self.few_shot = min_weight, neighbours, beta, gamma, few_shot
        self.normalize, self.public_code = normalize, public_code
        self.register_buffer("mean", torch.zeros(num_classes, embedding_size))
        self.register_buffer("variance", torch.zeros(num_classes, embedding_size))
        self.register_buffer("amount", torch.zeros(num_classes))
        self.register_buffer("count", torch.zeros(num_classes))
        self.register_buffer("generation_variance", torch.zeros(num_classes, embedding_size))
        self.progress = 0.0  # (next epoch) / epochs, for the public code's λ schedule; set by the trainer events

    @torch.no_grad()
    def estimate(self, raw: torch.Tensor, labels: torch.Tensor) -> None:
        """Merge the statistics of one pass (pre-normalisation embeddings, labels 0..C-1) and refresh Σ."""
        x = raw.to(self.mean.dtype)
        n, mean, var = class_moments(x, labels, self.num_classes)
        self.mean, self.variance, self.amount = merge_moments(
            self.mean, self.variance, self.amount, n, mean, var, self.min_weight)
        self.count = n
        corrected = self.variance
        if not self.public_code:
            nb, glob = neighbour_variance(self.mean, self.variance, n, self.neighbours)
            alpha = correction_weight(n, self.beta, self.few_shot)[:, None]
            corrected = (1 - alpha) * self.variance + alpha * ((1 - self.gamma) * nb + self.gamma * glob)
        self.generation_variance = corrected

    def _estimate_from(self, trainer: TrainerView) -> None:
        from deepmetric.inference import embed  # lazy: deepmetric.inference imports the data package, which imports this one

        raw, labels = embed(trainer.model, trainer.splits.train, trainer.config.eval.batch_size, trainer.device,
                            amp=trainer.amp_dtype, raw=True)
        self.estimate(raw.to(self.mean.device), trainer.label_map[labels].to(self.mean.device))

    def on_train_start(self, trainer: TrainerView) -> None:
        self.progress = (trainer.epoch + 1) / trainer.config.train.epochs
        if self.start_epoch == 0 and not bool(self.amount.any()):  # not on resume: the estimate is restored
            self._estimate_from(trainer)

    def on_epoch_end(self, trainer: TrainerView, epoch: int) -> None:
        epochs = trainer.config.train.epochs
        self.progress = (epoch + 1) / epochs
        if epoch >= self.start_epoch and (epoch - self.start_epoch) % self.every == 0 and epoch < epochs:
            self._estimate_from(trainer)

    def scale(self) -> float:
        """λ of the current epoch: constant, or the public code's step decay with ``public_code``."""
        if not self.public_code:
            return self.lam
        p = self.progress
        return self.lam * (1.0 if p <= 0.4 else 0.9 if p <= 0.6 else 0.75 if p <= 0.8 else 0.6)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, raw: torch.Tensor | None = None) -> Augmented:
        if self.num_copies == 0 or not bool(self.amount.any()):
            return self.identity(embeddings, labels)
        check_class_batch(embeddings, labels, self.num_classes, self.embedding_size, "iaa")
        z = as_compute_dtype(embeddings if raw is None else raw)
        m, (b, d) = self.num_copies, z.shape
        var = self.generation_variance[labels].to(z.dtype)
        if self.public_code:
            powers = 0.5 ** torch.arange(1, m + 1, device=z.device, dtype=z.dtype)
            std = var[None] ** powers[:, None, None]
        else:
            std = var.sqrt().expand(m, b, d)
        x = z + math.sqrt(self.scale()) * std * torch.randn(m, b, d, device=z.device, dtype=z.dtype)
        x = maybe_normalize(x, self.normalize).reshape(m * b, d)
        return self.append(embeddings, labels, x, labels.repeat(m),
                           pairs=copies_rule(b, b * (m + 1), embeddings.device))

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, num_copies={self.num_copies}, lam={self.lam}, every={self.every}, "
                f"start_epoch={self.start_epoch}, public_code={self.public_code}")
