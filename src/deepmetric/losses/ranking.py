"""Ranking (average-precision) losses: Smooth-AP, ROADMAP, FastAP and stochastic AUPRC (SOPRC).

All take ``(embeddings [B, D], labels [B], indices=None, ref_embeddings=None, ref_labels=None)`` and
return a scalar. Each query q (a row of the batch) ranks its retrieval set Ω by cosine similarity
``s_j = x̂_qᵀx̂_j`` (the papers' embeddings are L2-normalised). Ω is the rest of the batch (q itself is
not in Ω unless ``include_query=True``), or the references (``ref_embeddings``, e.g. the trainer's
cross-batch memory, ``memory.size``). P ⊂ Ω are q's positives (same label, or the positive pairs of
mined ``indices``), N its negatives. Every loss is ``1 − mean_q AP̂_q`` over the queries with |P| ≥ 1
(SOPRC: the mean over (query, positive) pairs of ``1 − precision``); queries without a positive are left
out and counted in ``loss.queries_without_positives``. A batch without any positive gives a zero loss.

The loss is a function of the ``[B, R]`` similarity matrix only. Each one computes its value and its
hand-derived gradient ``∂L/∂S`` together (checked by ``gradcheck``), in chunks of queries whose
``[b, K, R]`` temporaries (K = the most positives of a query) hold at most ``max(B·R, 2²²)`` elements,
so memory is O(B·R), never the O(B³) of the official code; autograd then back-propagates ``∂L/∂S``
through the similarity product. Computed in float32 (half precision is cast up, autocast disabled).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from deepmetric.distances import full_precision
from deepmetric.errors import ConfigError, InputError, LabelError
from deepmetric.losses import register
from deepmetric.losses.base import Batch, Indices, PairLoss, Pairs, make_distance, make_pairs, prepare, reduce

CHUNK_ELEMENTS = 2**22  # floor of the per-chunk [b, K, R] temporaries (16 MB in float32)

Kernel = Callable[[torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass
class Ranking:
    """What a ranking loss needs about each query's retrieval set.

    ``sim [B, R]``: cosine similarities (in the autograd graph). ``pos_idx``/``pos_w [B, K]``: each
    query's positives as padded columns of ``sim`` (``pos_w`` 1 for a positive, 0 for padding).
    ``masks [B, 2, R]``: 0/1 indicators of P and N. ``n_pos [B]``: |P|; ``valid [B]``: 1 where |P| ≥ 1.
    ``pairs``: the query-reference pairs without the query itself (``include_query`` adds it above).
    """

    sim: torch.Tensor
    pos_idx: torch.Tensor
    pos_w: torch.Tensor
    masks: torch.Tensor
    n_pos: torch.Tensor
    valid: torch.Tensor
    pairs: Pairs

    @property
    def pos(self) -> torch.Tensor:
        return self.masks[:, 0]

    @property
    def neg(self) -> torch.Tensor:
        return self.masks[:, 1]

    def chunks(self) -> Iterator[slice]:
        """Slices of queries whose ``[b, K, R]`` tensors hold at most ``max(B·R, 2²²)`` elements."""
        n, r = self.sim.shape
        per_query = max(self.pos_idx.shape[1] * r, 1)
        rows = max(1, max(n * r, CHUNK_ELEMENTS) // per_query)
        return (slice(i, i + rows) for i in range(0, n, rows))

    def ap_scale(self) -> torch.Tensor:
        """``∂(1 − mean_q AP_q)/∂AP_q`` per query ``[B]``: ``−1/Q`` for the Q valid queries, 0 otherwise."""
        return -self.valid / self.valid.sum().clamp(min=1)


class _FromScores(torch.autograd.Function):
    """``L = kernel(S)`` where the kernel returns the value and ``∂L/∂S`` itself; only that ``[B, R]``
    gradient is kept for the backward pass."""

    @staticmethod
    def forward(ctx, sim: torch.Tensor, kernel: Kernel) -> torch.Tensor:
        value, grad = kernel(sim.detach(), ctx.needs_input_grad[0])
        ctx.save_for_backward(grad if grad is not None else sim.new_zeros(()))
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * g, None


def _pair_differences(s: torch.Tensor, sp: torch.Tensor) -> torch.Tensor:
    """``t[q, k, j] = s_qj − s_q,k``: each reference's score minus the k-th positive's, ``[b, K, R]``."""
    return s[:, None, :] - sp[:, :, None]


class RankingLoss(PairLoss):
    """Base of the ranking losses: validated inputs -> :class:`Ranking` -> ``self.kernel`` (value and
    ``∂L/∂S``) behind one autograd node.

    ``include_query`` (batch mode only) puts the query in its own retrieval set as a positive with
    ``s_qq = 1``, as the official Smooth-AP and ROADMAP code does (it inflates AP; off by default).
    """

    include_query = False

    def __init__(self) -> None:
        super().__init__()
        self.distance = make_distance("cosine", True)
        self.queries_without_positives = 0

    def ranking(self, b: Batch, indices: Indices | None) -> Ranking:
        sim = self.matrix(b)
        pairs = make_pairs(b, indices)
        pos_idx, pos_w = pairs.pos_idx, pairs.pos_w  # 0/1 (pairs counted once), positives distinct
        if self.include_query and b.self_ref:
            diag = torch.arange(sim.shape[0], device=sim.device)[:, None]
            pos_idx, pos_w = torch.cat([diag, pos_idx], 1), torch.cat([torch.ones_like(pos_w[:, :1]), pos_w], 1)
        masks = sim.new_empty(sim.shape[0], 2, sim.shape[1])
        masks[:, 0].zero_().scatter_add_(1, pos_idx, pos_w)  # padding adds 0
        masks[:, 1].copy_(pairs.neg)
        n_pos = pos_w.sum(1)
        valid = (n_pos > 0).to(sim.dtype)
        self.queries_without_positives = int(sim.shape[0] - valid.sum())
        return Ranking(sim, pos_idx, pos_w, masks, n_pos, valid, pairs)

    def compute(self, b: Batch, indices: Indices | None) -> torch.Tensor:
        r = self.ranking(b, indices)
        return _FromScores.apply(r.sim, lambda s, need_grad: self.kernel(s, r, need_grad))

    def kernel(self, s: torch.Tensor, r: Ranking, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The loss and (if ``need_grad``) ``∂L/∂S`` for the detached similarities ``s``."""
        raise NotImplementedError


# ------------------------------------------------------------------------------------------- Smooth-AP


@register("smooth_ap")
class SmoothAPLoss(RankingLoss):
    """Smooth-AP (Brown, Xie, Kalogeiton & Zisserman, ECCV 2020): ranks relaxed by a sigmoid.

    With ``G(t) = σ(t/τ)`` and ``D_ij = s_j − s_i``:
    ``AP̂_q = 1/|P| Σ_{i∈P} [1 + Σ_{j∈P, j≠i} G(D_ij)] / [1 + Σ_{j∈Ω, j≠i} G(D_ij)]``, ``L = 1 − mean_q AP̂_q``.
    As τ → 0 this is the exact AP of the batch. τ = 0.01 (official code). The official code clamps t/τ
    to ±50 before the exponential; ``torch.sigmoid`` is stable without it (the values differ by < 1e-21).
    ``include_query=True`` reproduces the official code (and PML's ``SmoothAPLoss``), which keeps the query
    in its own retrieval and positive sets. Unlike those, any labels work (no equal class sizes needed).
    """

    def __init__(self, tau: float = 0.01, include_query: bool = False):
        super().__init__()
        if tau <= 0:
            raise ConfigError(f"tau must be positive, got {tau}")
        self.tau, self.include_query = tau, include_query

    def kernel(self, sim, r, need_grad):
        ap = sim.new_zeros(sim.shape[0])
        grad = torch.zeros_like(sim) if need_grad else None
        scale = r.ap_scale() / r.n_pos.clamp(min=1)
        for rows in r.chunks():
            s, idx, w, masks = sim[rows], r.pos_idx[rows], r.pos_w[rows], r.masks[rows]
            g = torch.sigmoid(_pair_differences(s, s.gather(1, idx)).div_(self.tau))  # [b, K, R]
            sums = torch.bmm(g, masks.transpose(1, 2))  # Σ_{j∈P} G, Σ_{j∈N} G; the j = i term of P is G(0) = 1/2
            above = sums[..., 0] + 0.5  # 1 + Σ_{j∈P, j≠i} G(D_ij)
            rank = above + sums[..., 1]
            ap[rows] = (w * above / rank).sum(1) / r.n_pos[rows].clamp(min=1)
            if need_grad:
                # ∂(A/R)/∂G_ij = N_i/R² for j ∈ P, −A_i/R² for j ∈ N; ∂G_ij/∂s_j = −∂G_ij/∂s_i = G(1 − G)/τ
                c = scale[rows, None] * w / rank.square()
                coef = torch.stack([c * sums[..., 1], -c * above], 1)  # [b, 2, K]
                dg = g.sub_(g.square()).div_(self.tau)
                grad[rows] = (masks * torch.bmm(coef, dg)).sum(1)
                grad[rows].scatter_add_(1, idx, -(torch.bmm(dg, masks.transpose(1, 2)) * coef.transpose(1, 2)).sum(2))
        return (1 - ap) @ r.valid / r.valid.sum().clamp(min=1), grad

    def extra_repr(self) -> str:
        return f"tau={self.tau}, include_query={self.include_query}"


# --------------------------------------------------------------------------------------------- ROADMAP


def supap_step(
    t: torch.Tensor, tau: float, rho: float, delta: float, offset: float, start: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """ROADMAP's upper-bounding surrogate H̃⁻ of the step ``1[t > 0]`` for a negative ranked ``t`` above
    a positive, and its derivative: ``σ(t/τ)`` for t ≤ 0, ``start + σ(t/τ)`` for 0 < t ≤ δ,
    ``ρ(t − δ) + offset`` for t > δ (``step_rank`` of the official code)."""
    sig = torch.sigmoid(t / tau)
    above = t > delta
    value = torch.where(above, rho * (t - delta) + offset, sig + start * (t > 0).to(t.dtype))
    slope = torch.where(above, torch.full_like(t, rho), sig * (1 - sig) / tau)
    return value, slope


@register("roadmap")
class ROADMAPLoss(RankingLoss):
    """ROADMAP (Ramzi, Thome, Rambour, Audebert & Bitot, NeurIPS 2021): ``L = L_SupAP + λ·L_calib``.

    ``AP̂_q = 1/|P| Σ_{k∈P} rank⁺(k) / (rank⁺(k) + rank⁻(k))`` with the exact
    ``rank⁺(k) = 1 + Σ_{j∈P∖{k}} H(s_j − s_k)`` (H(0) = 1, no gradient) and the upper bound
    ``rank⁻(k) = Σ_{j∈N} H̃⁻(s_j − s_k)`` (:func:`supap_step`: H̃⁻ ≥ 1[t > 0], so L_SupAP = 1 − AP̂ ≥
    1 − AP). Its constant slope ρ beyond δ keeps badly ranked negatives' gradients from vanishing.

    Calibration (the paper's answer to the decomposability gap between batch AP and training-set AP):
    ``L_calib = avg_nonzero_{pos pairs}[β − s]_+ + avg_nonzero_{neg pairs}[s − α]_+``, contrastive
    thresholds that make per-batch scores consistent with the global ranking.

    Defaults (official ``config/loss/roadmap.yaml``): τ = 0.01, ρ = 100, δ = 0.05, offset c = 1.44,
    start 0.5 (iNaturalist: c = 1, start 0), β (``pos_margin``) = 0.9, α (``neg_margin``) = 0.6,
    λ (``calibration_weight``) = 1. ``offset=None`` makes H̃⁻ continuous at δ (c = start + σ(δ/τ)).
    The official code's optional memory of past embeddings is the trainer's cross-batch memory
    (``memory.size``), which calls this loss with ``ref_embeddings``/``ref_labels``.
    """

    def __init__(
        self,
        tau: float = 0.01,
        rho: float = 100.0,
        delta: float = 0.05,
        offset: float | None = 1.44,
        start: float = 0.5,
        pos_margin: float = 0.9,
        neg_margin: float = 0.6,
        calibration_weight: float = 1.0,
        include_query: bool = False,
    ):
        super().__init__()
        if tau <= 0 or delta < 0 or rho < 0:
            raise ConfigError(f"need tau > 0, delta >= 0 and rho >= 0, got tau={tau}, delta={delta}, rho={rho}")
        self.tau, self.rho, self.delta, self.start = tau, rho, delta, start
        self.offset = start + 1 / (1 + math.exp(-delta / tau)) if offset is None else offset
        self.pos_margin, self.neg_margin = pos_margin, neg_margin
        self.calibration_weight, self.include_query = calibration_weight, include_query

    def compute(self, b: Batch, indices: Indices | None) -> torch.Tensor:
        r = self.ranking(b, indices)
        loss = _FromScores.apply(r.sim, lambda s, need_grad: self.kernel(s, r, need_grad))
        if self.calibration_weight:
            loss = loss + self.calibration_weight * self.calibration(r)
        return loss

    def calibration(self, r: Ranking) -> torch.Tensor:
        """``L_calib`` on the query-reference pairs (the query itself never counts); 0 for a batch without
        a positive or a negative pair, as the library's contrastive loss."""
        pos = reduce(F.relu(self.pos_margin - r.pairs.positives(r.sim)), r.pairs.pos_w, "avg_nonzero")
        return (pos + reduce(F.relu(r.sim - self.neg_margin), r.pairs.neg, "avg_nonzero")) * r.pairs.present()

    def kernel(self, sim, r, need_grad):
        ap = sim.new_zeros(sim.shape[0])
        grad = torch.zeros_like(sim) if need_grad else None
        scale = r.ap_scale() / r.n_pos.clamp(min=1)
        for rows in r.chunks():
            s, idx, w = sim[rows], r.pos_idx[rows], r.pos_w[rows]
            pos, neg = r.pos[rows, :, None], r.neg[rows, :, None]
            t = _pair_differences(s, s.gather(1, idx))  # [b, K, R]
            rank_pos = torch.bmm((t >= 0).to(t.dtype), pos)[..., 0]  # includes k itself: H(0) = 1
            h, dh = supap_step(t, self.tau, self.rho, self.delta, self.offset, self.start)
            rank = rank_pos + torch.bmm(h, neg)[..., 0]
            ap[rows] = (w * rank_pos / rank).sum(1) / r.n_pos[rows].clamp(min=1)
            if need_grad:  # ∂(r⁺/(r⁺ + r⁻))/∂r⁻ = −r⁺/rank²; ∂H̃⁻(s_j − s_k)/∂s_j = −∂/∂s_k = H̃⁻'
                c = -scale[rows, None] * w * rank_pos / rank.square()  # ∂L/∂rank⁻_k ≥ 0
                grad[rows] = torch.bmm(c[:, None, :], dh)[:, 0] * neg[..., 0]
                grad[rows].scatter_add_(1, idx, -c * torch.bmm(dh, neg)[..., 0])
        return (1 - ap) @ r.valid / r.valid.sum().clamp(min=1), grad

    def extra_repr(self) -> str:
        return (f"tau={self.tau}, rho={self.rho}, delta={self.delta}, offset={self.offset:.4g}, "
                f"start={self.start}, pos_margin={self.pos_margin}, neg_margin={self.neg_margin}, "
                f"calibration_weight={self.calibration_weight}, include_query={self.include_query}")


# --------------------------------------------------------------------------------------------- FastAP


@register("fast_ap")
class FastAPLoss(RankingLoss):
    """FastAP (Cakir, He, Xia, Kulis & Sclaroff, CVPR 2019): AP from soft distance histograms.

    Squared distances ``d² = 2 − 2s ∈ [0, 4]`` fall into L bins with centres ``z_l = 4l/L`` (l = 0..L)
    by the triangular kernel ``κ_l(d²) = [1 − |d² − z_l|/Δ]_+``, Δ = 4/L. Per query,
    ``h⁺_l = Σ_{j∈P} κ_l``, ``h_l = Σ_{j∈Ω} κ_l``, H⁺ and H their cumulative sums and
    ``FastAP_q = 1/|P| Σ_l h⁺_l H⁺_l / H_l`` (0/0 = 0); ``L = 1 − mean_q FastAP_q``. L = 10 (official).

    Each distance touches only its two neighbouring bins, so the histograms are two scatter-adds and
    the whole loss is O(B·R) (PML builds ``[L+1, B, R]``). Matches PML's ``FastAPLoss``.
    """

    def __init__(self, num_bins: int = 10):
        super().__init__()
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
            raise ConfigError(f"num_bins must be a positive integer, got {num_bins!r}")
        self.num_bins = num_bins

    def kernel(self, sim, r, need_grad):
        n, bins = sim.shape[0], self.num_bins
        u = sim.mul(-bins / 2).add_(bins / 2).clamp_(0, bins)  # d²·L/4: position on the bin axis, [0, L]
        lo = u.floor().clamp_(max=bins - 1)
        hi_w = u.sub_(lo)  # weight of bin lo + 1 (1 − that for bin lo)
        # histograms of P (slots 0..L) and N (slots L+1..2L+1): two scatter-adds of the two kernel weights
        slot = lo.add_(r.neg, alpha=bins + 1).long()
        weight = r.pos + r.neg  # 1 for j ∈ Ω
        hi_w.mul_(weight)
        hist = sim.new_zeros(n, 2 * (bins + 1))
        hist.scatter_add_(1, slot, weight.sub_(hi_w)).scatter_add_(1, slot.add_(1), hi_w)
        h_pos, h_neg = hist[:, : bins + 1], hist[:, bins + 1 :]
        cum_pos, cum_all = h_pos.cumsum(1), (h_pos + h_neg).cumsum(1)
        safe = cum_all > 0
        inv = torch.where(safe, 1 / cum_all.where(safe, torch.ones_like(cum_all)), torch.zeros_like(cum_all))
        fast_ap = (h_pos * cum_pos * inv).sum(1) / r.n_pos.clamp(min=1)
        value = (1 - fast_ap) @ r.valid / r.valid.sum().clamp(min=1)
        if not need_grad:
            return value, None

        def suffix(x: torch.Tensor) -> torch.Tensor:  # Σ_{m ≥ l} x_m
            return x.flip(1).cumsum(1).flip(1)

        scale = (r.ap_scale() / r.n_pos.clamp(min=1))[:, None]
        d_pos = scale * (cum_pos * inv + suffix(h_pos * inv))  # ∂L/∂h⁺_l
        d_all = -scale * suffix(h_pos * cum_pos * inv.square())  # ∂L/∂h_l (h = h⁺ + h⁻)
        d_pos = d_pos + d_all
        d_bins = torch.cat([d_pos, d_all], 1)  # per slot, as ``slot`` indexes ``hist``
        # ∂κ_lo/∂u = −1, ∂κ_lo+1/∂u = +1 (one-sided at bin centres and at the clamp); ∂u/∂s = −L/2
        du = d_bins.gather(1, slot).sub_(d_bins.gather(1, slot.sub_(1)))
        return value, du.mul_(r.pos + r.neg).mul_(-bins / 2)

    def extra_repr(self) -> str:
        return f"num_bins={self.num_bins}"


# ---------------------------------------------------------------------------------- stochastic AUPRC


def soprc_l1(t: torch.Tensor, tau1: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SOPRC's surrogate of 1[negative above positive] for ``t = s_pos − s_neg`` and its derivative:
    with t clamped at ≤ τ₁, ``(t/τ₁ − 1)²`` for t ≥ 0 and ``1 − 2t/τ₁`` for t < 0 (C¹ at 0)."""
    tc = t.clamp(max=tau1)
    right = tc >= 0
    value = torch.where(right, (tc / tau1 - 1).square(), 1 - 2 * tc / tau1)
    slope = torch.where(right, 2 * (tc / tau1 - 1) / tau1, torch.full_like(t, -2 / tau1))
    return value, slope


def soprc_l2(t: torch.Tensor, tau2: float) -> torch.Tensor:
    """SOPRC's surrogate of ``1[t < 0]``: ``2 / (1 + e^{min(t, 0)/τ₂}) − 1``."""
    return 2 * torch.sigmoid(-t.clamp(max=0) / tau2) - 1


@register("auprc")
class StochasticAUPRCLoss(RankingLoss):
    """Stochastic AUPRC optimisation, SOPRC (Wen, Xu, Yang, He & Huang, NeurIPS 2022): precision from rates.

    "Exploring the Algorithm-Dependent Generalization of AUPRC Optimization with List Stability": a
    sampling-rate-invariant estimator with moving-average (compositional) updates.

    For query q of class c and each positive k, precision is estimated from *rates*:
    ``FPR̂_k = 1/|N| Σ_{n∈N} ℓ₁(s_k − s_n)`` (:func:`soprc_l1`, with gradient) and
    ``TPR̂_k = (1 + Σ_{t=1}^{M} ℓ₂(s_k − v_{c,t})) / (M + 1)`` (:func:`soprc_l2`, no gradient), where
    ``v_c ∈ R^M`` is a moving average of class c's positive scores; ``r_k = (1 − π_c)/π_c · FPR̂_k/TPR̂_k``
    and ``L = mean_{q,k} r_k / (1 + r_k)`` (= 1 − the precision estimate). Rates, unlike the counts of
    Smooth-AP, have an expectation that does not depend on how many positives and negatives the sampler
    puts in a batch. π_c is the population prior ``prior_mul · n_c / max_c' n_c'``.

    State (buffers, saved in checkpoints): ``v [C, M]`` (initialised to ``arange(M)/M``) and
    ``sample_labels [num_samples]``, the label of each training sample seen so far (−1 = not yet), which
    gives the class counts n_c (exact after one epoch). Each batch-mode call (no references) in training
    mode needs ``sample_ids`` (data-set indices; the trainer passes them) and updates the state first,
    as the official code does: every query's sorted positive scores are linearly interpolated to M points
    (⌈M/|P|⌉ per interval, end points extrapolated and clamped to [−1, 1], left- and right-anchored
    interpolants averaged), the interpolants of one class are averaged (the official code lets the last
    write win) and ``v_c ← (1 − β) v_c + β · interp``. A call with references (the cross-batch memory)
    ranks the queries against them with the current state; there ``sample_ids`` is optional.

    Defaults (official code): τ₁ = 0.1, τ₂ = 0.001, β = 0.1, M = 100, ``prior_mul`` = 0.01. The official
    recipe adds a semi-variance regulariser ``variance_weight · (mean_{s_p < μ_p}(μ_p − s_p)² +
    5·mean_{s_n > μ_n}(s_n − μ_n)²)`` (μ: batch means of the positive / negative scores), weight 1 with
    SGD, 5 with Adam. Needs ``num_classes`` and ``num_samples`` (the trainer fills both in); labels in
    ``0..C-1``.
    """

    def __init__(
        self,
        num_classes: int,
        num_samples: int,
        tau1: float = 0.1,
        tau2: float = 0.001,
        beta: float = 0.1,
        prior_mul: float = 0.01,
        num_points: int = 100,
        variance_weight: float = 1.0,
    ):
        super().__init__()
        for name, value in (("num_classes", num_classes), ("num_samples", num_samples), ("num_points", num_points)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if tau1 <= 0 or tau2 <= 0 or not 0 < beta <= 1 or prior_mul <= 0:
            raise ConfigError(
                f"need tau1 > 0, tau2 > 0, 0 < beta <= 1 and prior_mul > 0, got tau1={tau1}, tau2={tau2}, "
                f"beta={beta}, prior_mul={prior_mul}"
            )
        self.num_classes, self.num_samples, self.num_points = num_classes, num_samples, num_points
        self.tau1, self.tau2, self.beta, self.prior_mul = tau1, tau2, beta, prior_mul
        self.variance_weight = variance_weight
        self.register_buffer("v", (torch.arange(num_points) / num_points).repeat(num_classes, 1))
        self.register_buffer("sample_labels", torch.full((num_samples,), -1, dtype=torch.long))

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices: Indices | None = None,
        ref_embeddings: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
        sample_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b = prepare(embeddings, labels, ref_embeddings, ref_labels)
        labels = b.labels.to(self.v.device)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise LabelError(
                f"auprc has num_classes={self.num_classes}, so labels must lie in [0, {self.num_classes}), got "
                f"[{int(labels.min())}, {int(labels.max())}]; remap labels to 0..C-1"
            )
        update = self.training and b.self_ref
        if sample_ids is None and update:
            raise InputError(
                "auprc keeps per-sample state: pass sample_ids=<data-set indices of the batch> (LongTensor [B]); "
                "the trainer does this automatically"
            )
        if sample_ids is not None:
            self._record_samples(sample_ids, labels)
        with full_precision(b.x.device.type):
            r = self.ranking(b, indices)
            if update:
                self._update_v(r, labels)
            loss = _FromScores.apply(r.sim, lambda s, need_grad: self.kernel(s, r, need_grad, labels))
            if self.variance_weight:
                loss = loss + self.variance_weight * self.semi_variance(r) * r.pairs.present()
            return loss

    @torch.no_grad()
    def _record_samples(self, sample_ids: torch.Tensor, labels: torch.Tensor) -> None:
        if (not isinstance(sample_ids, torch.Tensor) or sample_ids.ndim != 1 or sample_ids.is_floating_point()
                or sample_ids.dtype == torch.bool or sample_ids.shape[0] != labels.shape[0]):
            raise InputError(
                f"sample_ids must be a 1-D integer tensor with one data-set index per embedding ({labels.shape[0]}), "
                f"got {type(sample_ids).__name__} {tuple(getattr(sample_ids, 'shape', ()))} "
                f"{getattr(sample_ids, 'dtype', '')}"
            )
        ids = sample_ids.to(self.sample_labels.device).long()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_samples):
            raise InputError(
                f"sample_ids must lie in [0, num_samples={self.num_samples}), got [{int(ids.min())}, {int(ids.max())}]; "
                "build the loss with num_samples = the training-set size"
            )
        seen = self.sample_labels[ids]
        changed = (seen >= 0) & (seen != labels)
        if bool(changed.any()):
            i = int(changed.nonzero()[0, 0])
            raise InputError(
                f"sample {int(ids[i])} was seen with label {int(seen[i])} and now has label {int(labels[i])}; "
                "sample_ids must be the data-set indices of the training samples"
            )
        self.sample_labels[ids] = labels

    def prior(self, labels: torch.Tensor) -> torch.Tensor:
        """π_c of each query's class from the class counts seen so far (a class not seen yet counts as
        the largest one: π = ``prior_mul``)."""
        seen = self.sample_labels[self.sample_labels >= 0]
        counts = torch.bincount(seen, minlength=self.num_classes).float()
        top = counts.max().clamp(min=1)
        n = counts[labels]
        return self.prior_mul * torch.where(n > 0, n, top) / top

    @torch.no_grad()
    def interpolate(self, r: Ranking) -> tuple[torch.Tensor, torch.Tensor]:
        """Each query's sorted positive scores interpolated to ``M`` points ``[B, M]`` (the official
        ``v_left``/``v_right`` average), and whether the query has a positive."""
        m = self.num_points
        sp = r.sim.detach().gather(1, r.pos_idx).masked_fill(r.pos_w == 0, float("inf")).sort(1).values
        n = r.n_pos.long()
        last = (n - 1).clamp(min=0)[:, None]
        first_s, last_s = sp[:, :1], sp.gather(1, last)
        second = sp[:, 1:2] if sp.shape[1] > 1 else first_s
        before_last = sp.gather(1, (last - 1).clamp(min=0))
        single = (n < 2)[:, None]  # one positive: a constant interpolant
        left_end = torch.where(single, first_s, (2 * first_s - second).clamp(min=-1))
        right_end = torch.where(single, last_s, (2 * last_s - before_last).clamp(max=1))
        left = torch.cat([left_end, sp[:, :-1]], 1)  # the previous score (extrapolated for the first)
        right = torch.cat([sp[:, 1:], sp[:, -1:]], 1)
        k = torch.arange(sp.shape[1], device=sp.device)[None, :]
        right = torch.where(k == last, right_end, right)  # the next score (extrapolated for the last)
        per = (m + n.clamp(min=1) - 1) // n.clamp(min=1)  # ⌈M/|P|⌉ points per interval
        t = torch.arange(m, device=sp.device)[None, :]
        seg, alpha = t // per[:, None], (t % per[:, None]) / per[:, None]
        s, lo, hi = sp.gather(1, seg), left.gather(1, seg), right.gather(1, seg)
        points = 0.5 * (lo + alpha * (s - lo) + s + alpha * (hi - s))
        has = n > 0
        return points.where(has[:, None], torch.zeros_like(points)), has

    @torch.no_grad()
    def _update_v(self, r: Ranking, labels: torch.Tensor) -> None:
        points, has = self.interpolate(r)
        w = has.to(points.dtype)
        total = torch.zeros_like(self.v, dtype=points.dtype).index_add_(0, labels, points * w[:, None])
        count = torch.zeros(self.num_classes, dtype=points.dtype, device=points.device).index_add_(0, labels, w)
        present = count > 0
        mean = (total[present] / count[present, None]).to(self.v.dtype)
        self.v[present] = (1 - self.beta) * self.v[present] + self.beta * mean

    def rates(self, s: torch.Tensor, r: Ranking, labels: torch.Tensor, rows: slice):
        """For the queries ``rows``: ``t = s_k − s_n [b, K, R]``, ``FPR̂ [b, K]``, ``TPR̂ [b, K]`` and |N| [b]."""
        idx, neg = r.pos_idx[rows], r.neg[rows]
        sp = s[rows].gather(1, idx)
        t = -_pair_differences(s[rows], sp)
        n_neg = neg.sum(1).clamp(min=1)
        l1, dl1 = soprc_l1(t, self.tau1)
        fpr = torch.bmm(l1, neg[:, :, None])[..., 0] / n_neg[:, None]
        v = self.v[labels[rows]].to(s.dtype)  # [b, M]
        tpr = (1 + soprc_l2(sp[:, :, None] - v[:, None, :], self.tau2).sum(2)) / (self.num_points + 1)
        return dl1, fpr, tpr, n_neg

    def kernel(self, sim, r, need_grad, labels):
        prior = self.prior(labels).to(sim.dtype)
        odds = ((1 - prior) / prior)[:, None]
        grad = torch.zeros_like(sim) if need_grad else None
        total = sim.new_zeros(())
        n_pairs = r.pos_w.sum().clamp(min=1)
        for rows in r.chunks():
            w, neg = r.pos_w[rows], r.neg[rows]
            dl1, fpr, tpr, n_neg = self.rates(sim, r, labels, rows)
            ratio = odds[rows] * fpr / tpr
            total = total + (w * ratio / (1 + ratio)).sum()
            if need_grad:  # ∂L/∂FPR̂_k = odds/(TPR̂ (1 + r)²) / #pairs; ∂ℓ₁(s_k − s_n)/∂s_k = −∂/∂s_n = ℓ₁'
                c = w * odds[rows] / (tpr * (1 + ratio).square()) / (n_pairs * n_neg[:, None])
                grad[rows] = -torch.bmm(c[:, None, :], dl1)[:, 0] * neg
                grad[rows].scatter_add_(1, r.pos_idx[rows], c * torch.bmm(dl1, neg[:, :, None])[..., 0])
        return total / n_pairs, grad

    def semi_variance(self, r: Ranking) -> torch.Tensor:
        """``mean_{s_p < μ_p}(μ_p − s_p)² + 5·mean_{s_n > μ_n}(s_n − μ_n)²`` over the batch's pairs."""
        sp, w, neg = r.sim.gather(1, r.pos_idx), r.pos_w, r.neg
        mu_p = (sp * w).sum() / w.sum().clamp(min=1)
        mu_n = (r.sim * neg).sum() / neg.sum().clamp(min=1)
        low = w * (sp < mu_p).to(w.dtype)
        high = neg * (r.sim > mu_n).to(neg.dtype)
        return (reduce((mu_p - sp).square(), low, "mean")
                + 5 * reduce((r.sim - mu_n).square(), high, "mean"))

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, num_samples={self.num_samples}, tau1={self.tau1}, "
                f"tau2={self.tau2}, beta={self.beta}, prior_mul={self.prior_mul}, num_points={self.num_points}, "
                f"variance_weight={self.variance_weight}")
