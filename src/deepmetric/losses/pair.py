"""Pair-based losses: contrastive, triplet, N-pair, margin, multi-similarity, circle, SupCon, NT-Xent.

All take ``(embeddings [B, D], labels [B], indices=None, ref_embeddings=None, ref_labels=None)`` and
return a scalar. ``indices`` are pairs ``(a1, p, a2, n)`` or triplets ``(a, p, n)`` from any miner;
``ref_embeddings``/``ref_labels`` replace the batch as the other side of each pair (cross-batch memory).
Everything is computed on one ``[B, R]`` similarity/distance matrix with masks; half precision is
computed in float32.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from deepmetric.distances import gram, normalize, unit_rows, unit_rows_backward
from deepmetric.errors import ConfigError, InputError, LabelError
from deepmetric.matmul import mm
from deepmetric.losses import register
from deepmetric.losses.base import (
    BIG,
    Batch,
    Indices,
    PairLoss,
    Pairs,
    Reduction,
    check_indices,
    check_reduction,
    count_ones,
    label_positives,
    make_distance,
    make_pairs,
    masked_logsumexp,
    reduce,
    take,
)


def multi_similarity_mining(sim: torch.Tensor, pairs: Pairs, epsilon: float) -> Pairs:
    """Multi-similarity pair mining (Wang et al., CVPR 2019) on a similarity matrix ``[B, R]``.

    Keeps negative ``n`` of anchor ``i`` if ``s_in + ε > min_{p∈P_i} s_ip`` and positive ``p`` if
    ``s_ip − ε < max_{n∈N_i} s_in``, min and max over the unmined candidate pairs.
    """
    with torch.no_grad():
        s_pos = pairs.positives(sim)
        min_pos = (s_pos - pairs.pos_add).amin(1, keepdim=True)
        max_neg = (sim + pairs.neg_add).amax(1, keepdim=True)
        pos_w = pairs.pos_w * (s_pos - epsilon < max_neg).to(sim.dtype)
        neg = pairs.neg * (sim > min_pos - epsilon).to(sim.dtype)
        return Pairs(pairs.pos_idx, pos_w, neg)


@register("multi_similarity")
class MultiSimilarityLoss(PairLoss):
    """Multi-similarity loss (Wang, Han, Huang, Dong & Scott, CVPR 2019), on cosine similarity s:

    ``L = 1/B Σ_i [ 1/α·log(1 + Σ_{p∈P̃_i} e^{−α(s_ip − λ)}) + 1/β·log(1 + Σ_{n∈Ñ_i} e^{β(s_in − λ)}) ]``

    where P̃_i, Ñ_i are the pairs kept by :func:`multi_similarity_mining` (``mining=True``), or all
    candidate pairs (``mining=False``; candidates = label pairs, or the pairs of ``indices``).
    Reduction: mean over the B anchors (anchors without pairs contribute 0); 0 if the batch has no
    positive or no negative pair.

    Defaults α = 2, β = 50, λ (``base``) = 0.5, ε = 0.1 follow the official code and PML; the paper's text
    gives λ = 1, and the official config's β (``SCALE_NEG``) is 40.

    ``parity=True`` reproduces the official code's quirks: positives with s ≥ 1 − 1e-5 (the anchor itself
    and exact duplicates) are dropped before mining, and anchors whose mined positive or negative set is
    empty contribute 0 (the divisor stays B).
    """

    def __init__(
        self,
        alpha: float = 2.0,
        beta: float = 50.0,
        base: float = 0.5,
        epsilon: float = 0.1,
        mining: bool = True,
        parity: bool = False,
    ):
        super().__init__()
        self.alpha, self.beta, self.base, self.epsilon = alpha, beta, base, epsilon
        self.mining, self.parity = mining, parity
        self.distance = make_distance("cosine", True)

    def compute(self, b: Batch, indices: Indices | None) -> torch.Tensor:
        sim = self.matrix(b)
        pairs = make_pairs(b, indices)
        present = pairs.present()
        if self.parity:
            keep = (pairs.positives(sim.detach()) < 1 - 1e-5).to(sim.dtype)
            pairs = Pairs(pairs.pos_idx, pairs.pos_w * keep, pairs.neg)
        if self.mining:
            pairs = multi_similarity_mining(sim.detach(), pairs, self.epsilon)
        s_pos = pairs.positives(sim)
        pos_term = masked_logsumexp(-self.alpha * (s_pos - self.base), pairs.pos_add, add_one=True)
        neg_term = masked_logsumexp(self.beta * (sim - self.base), pairs.neg_add, add_one=True)
        per_anchor = pos_term / self.alpha + neg_term / self.beta
        if self.parity:
            per_anchor = per_anchor * ((pairs.pos_w.sum(1) > 0) & (pairs.neg.sum(1) > 0)).to(sim.dtype)
        return per_anchor.sum() / sim.shape[0] * present

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, beta={self.beta}, base={self.base}, epsilon={self.epsilon}, "
            f"mining={self.mining}, parity={self.parity}"
        )


class _ContrastiveTerms(torch.autograd.Function):
    """``(L_pos, L_neg)`` of :class:`ContrastiveLoss` from its ``[B, R]`` matrix ``m``, with a hand-written
    backward.

    ``h⁺ = [σ(m_ap − m_pos)]_+`` on the positive pairs (``pos_idx`` with 0/1 ``pos_w``) and
    ``h⁻ = [σ(m_neg − m_an)]_+`` on the negative pairs (0/1 ``neg``), σ = +1 on a distance, −1 on a
    similarity; each part is ``Σ h^p / count · present`` with the count of the ``reduction`` (``avg_nonzero``:
    the pairs with ``h^p > 0``; ``mean_pos_neg``: the part's pairs; ``mean``: all pairs; ``sum``: none).
    The backward writes ∂/∂m once, into one ``[B, R]`` buffer (the negative pairs' ``−σ·p·(h⁻)^{p−1}``,
    then the positive pairs scattered in), where autograd would build, mask and add one ``[B, R]``
    gradient per operation; the values are the same as autograd's.
    """

    @staticmethod
    def forward(ctx, m, pos_idx, pos_w, neg, present, pos_margin: float, neg_margin: float, sign: float,
                power: int, reduction: str):
        h_pos = m.gather(1, pos_idx).sub_(pos_margin).mul_(sign).relu_()
        h_neg = ((neg_margin - m) if sign > 0 else (m - neg_margin)).relu_()
        n_all = (pos_w.sum() + neg.sum()).clamp(min=1) if reduction == "mean" else None
        terms, slopes, scales = [], [], []
        for h, w in ((h_pos, pos_w), (h_neg, neg)):
            h = h.mul_(w)  # masked before the power: the same values, as w is 0/1
            v = h * h if power == 2 else h
            active = torch.sign(v) if power == 1 or reduction == "avg_nonzero" else None  # 1 where ℓ > 0
            if reduction == "avg_nonzero":
                count = count_ones(active).clamp(min=1)
            elif reduction == "mean_pos_neg":
                count = w.sum().clamp(min=1)
            else:
                count = n_all  # None for "sum"
            total = v.sum()
            terms.append((total if count is None else total / count) * present)
            slopes.append(h.mul_(2.0) if power == 2 else active)  # ∂h^p/∂h on the pairs
            scales.append(count)
        ctx.sign, ctx.scales = sign, scales
        ctx.save_for_backward(pos_idx, present, *slopes)
        return tuple(terms)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_pos, grad_neg):
        pos_idx, present, slope_pos, slope_neg = ctx.saved_tensors
        (count_pos, count_neg), sign = ctx.scales, ctx.sign
        g_pos, g_neg = grad_pos * present, grad_neg * present  # as autograd: (grad · present) / count
        if count_pos is not None:
            g_pos, g_neg = g_pos / count_pos, g_neg / count_neg
        grad = slope_neg * (-sign * g_neg)
        grad.scatter_add_(1, pos_idx, slope_pos * (sign * g_pos))
        return grad, *[None] * 9


@register("contrastive")
class ContrastiveLoss(PairLoss):
    """Contrastive loss (Hadsell, Chopra & LeCun, CVPR 2006), in the two-margin library form.

    On a distance d: ``ℓ⁺ = [d − m_pos]_+^p``, ``ℓ⁻ = [m_neg − d]_+^p``; on a similarity s (``distance=
    "cosine"``): ``ℓ⁺ = [m_pos − s]_+^p``, ``ℓ⁻ = [s − m_neg]_+^p``. The paper's form
    ``(1−Y)·½d² + Y·½[m − d]_+²`` is ½ × (``power=2, pos_margin=0, neg_margin=m``, ``reduction="sum"``).

    Margins default to (0, 1) on a distance (PML; L2-normalised Euclidean) and to (0.9, 0.6) on cosine
    (ROADMAP's calibration loss). Reductions: ``mean`` over all pairs; ``avg_nonzero`` = mean of the
    non-zero ℓ⁺ + mean of the non-zero ℓ⁻ (PML's default); ``sum``; ``mean_pos_neg`` = mean ℓ⁺ over the
    positive pairs + mean ℓ⁻ over the negative pairs. 0 without positive or negative pairs.

    **Balance** (Sors, Sampaio de Rezende, Ibrahimi & Andreoli 2021): the loss is ``L = L_pos + λ·L_neg``
    (:meth:`terms`), the positive ("alignment") and negative ("entropy") parts, each aggregated by the
    reduction; λ = ``neg_weight`` (1 = the usual loss) and the margins are the balance hyper-parameters
    (``deepmetric tune`` searches them). Summing, or averaging all pairs together, shifts the effective
    balance as the batch grows (#neg/#pos ∝ B); ``mean_pos_neg`` averages each part separately, which keeps
    the optimal λ stable across batch sizes.
    """

    def __init__(
        self,
        pos_margin: float | None = None,
        neg_margin: float | None = None,
        power: int = 1,
        distance: str = "euclidean",
        normalize: bool = True,
        reduction: Literal["mean", "avg_nonzero", "sum", "mean_pos_neg"] = "mean",
        neg_weight: float = 1.0,
    ):
        super().__init__()
        if power not in (1, 2):
            raise ConfigError(f"power must be 1 or 2, got {power}")
        if neg_weight < 0:
            raise ConfigError(f"neg_weight (the balance λ) must be >= 0, got {neg_weight}")
        self.distance = make_distance(distance, normalize)
        sim = self.distance.is_similarity
        self.pos_margin = (0.9 if sim else 0.0) if pos_margin is None else float(pos_margin)
        self.neg_margin = (0.6 if sim else 1.0) if neg_margin is None else float(neg_margin)
        self.power = power
        self.reduction = reduction if reduction == "mean_pos_neg" else check_reduction(reduction)
        self.neg_weight = float(neg_weight)

    def compute_terms(self, b: Batch, indices: Indices | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L_pos, L_neg)`` with ``loss = L_pos + neg_weight · L_neg`` (Sors et al. 2021's decomposition)."""
        m = self.matrix(b)
        pairs = make_pairs(b, indices)
        sign = -1.0 if self.distance.is_similarity else 1.0
        return _ContrastiveTerms.apply(m, pairs.pos_idx, pairs.pos_w, pairs.neg, pairs.present(), self.pos_margin,
                                       self.neg_margin, sign, self.power, self.reduction)

    def compute(self, b: Batch, indices: Indices | None) -> torch.Tensor:
        pos, neg = self.compute_terms(b, indices)
        return pos + neg if self.neg_weight == 1 else pos + self.neg_weight * neg  # one autograd node fewer

    def extra_repr(self) -> str:
        return (
            f"pos_margin={self.pos_margin}, neg_margin={self.neg_margin}, power={self.power}, "
            f"distance={self.distance}, reduction={self.reduction!r}, neg_weight={self.neg_weight}"
        )


def all_triplet_values(dist: torch.Tensor, pairs: Pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """``d_ap − d_an`` for every triplet (a, p, n) with (a, p) positive and (a, n) negative, as a
    ``[B, K, R]`` tensor with its 0/1 weights (how PML converts pairs to triplets).

    K is the largest number of positives of an anchor, so memory is B·K·R (B³ only if one class fills
    the batch).
    """
    values = pairs.positives(dist)[:, :, None] - dist[:, None, :]
    return values, pairs.pos_w[:, :, None] * pairs.neg[:, None, :]


@register("triplet")
class TripletMarginLoss(PairLoss):
    """Triplet margin loss (Schroff, Kalenichenko & Philbin, FaceNet, CVPR 2015):
    ``ℓ_apn = [D(a,p) − D(a,n) + m]_+`` (``soft_margin``: ``softplus(D(a,p) − D(a,n) + m)``; with
    ``margin=0`` this is Hermans et al. 2017's soft margin).

    Defaults follow FaceNet: squared Euclidean on L2-normalised embeddings, m = 0.2 (PML: unsquared,
    m = 0.05). With a similarity (cosine), D = −s. Triplets: the miner's ``(a, p, n)``; from pairs or
    labels, every (a, p, n) with (a, p) positive and (a, n) negative (memory B·K·R, K = positives per
    anchor — use a miner for large classes). Reduction over triplets: ``mean`` (default), ``avg_nonzero``
    (PML's default), ``sum``.
    """

    def __init__(
        self,
        margin: float = 0.2,
        soft_margin: bool = False,
        distance: str = "squared_euclidean",
        normalize: bool = True,
        reduction: Reduction = "mean",
    ):
        super().__init__()
        self.margin = margin
        self.soft_margin = soft_margin
        self.distance = make_distance(distance, normalize)
        self.reduction = check_reduction(reduction)

    def compute(self, b: Batch, indices: Indices | None) -> torch.Tensor:
        if indices is not None and len(indices) == 3:
            a, p, n = (t.to(b.x.device) for t in check_indices(indices, *b.shape))
            if 8 * a.numel() <= b.shape[0] * b.shape[1]:  # few triplets (batch-hard): only their distances
                d = self.distance.paired_dissimilarity(b.x, torch.cat([a, a]), torch.cat([p, n]), b.ref)
            else:
                d = take(self.distance.dissimilarity(b.x, b.ref), torch.cat([a, a]), torch.cat([p, n]))  # one gather
            d_ap, d_an = d.view(2, -1)
            values, valid = d_ap - d_an, None
        else:
            values, valid = all_triplet_values(self.distance.dissimilarity(b.x, b.ref), make_pairs(b, indices))
        values = values + self.margin
        values = F.softplus(values) if self.soft_margin else torch.relu(values)
        return reduce(values, valid, self.reduction)

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, soft_margin={self.soft_margin}, distance={self.distance}, "
            f"reduction={self.reduction!r}"
        )


def npair_indices(labels: torch.Tensor, strict: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor and positive indices of an N-pair batch: the first two samples of each class.

    ``strict`` (Sohn 2016): every class must have exactly 2 samples, else :class:`InputError`. Otherwise
    classes with one sample are ignored and larger classes contribute their first two samples (PML).
    """
    order = torch.sort(labels, stable=True).indices
    sl = labels[order]
    first = torch.ones_like(sl, dtype=torch.bool)
    first[1:] = sl[1:] != sl[:-1]
    if strict and not (sl.numel() % 2 == 0 and bool(first[0::2].all()) and not bool(first[1::2].any())):
        classes, counts = torch.unique_consecutive(sl, return_counts=True)
        raise InputError(
            "the N-pair loss needs exactly 2 samples of each class in the batch (an anchor and a "
            f"positive); classes {classes[counts != 2][:5].tolist()} have {counts[counts != 2][:5].tolist()}. "
            "Build batches with the npair sampler (sampler.name=npair), or pass strict=False to use the "
            "first two samples of each class and ignore singletons"
        )
    has_second = torch.zeros_like(first)
    has_second[:-1] = ~first[1:]
    start = (first & has_second).nonzero().squeeze(1)
    return order[start], order[start + 1]


class _NPairCrossEntropy(torch.autograd.Function):
    """``cross_entropy(s·A Pᵀ, arange(N))`` (``symmetric``: averaged with the transposed problem) of the rows
    ``A = e[rows[:N]]``, ``P = e[rows[N:]]`` of the embeddings ``e`` (L2-normalised rows with ``unit``), with a
    hand-written backward: ``∂/∂logits = s·(softmax − I)/N``, two products, the normalisation's backward and
    one scatter into the batch (``rows`` are distinct). The forward runs the same operations as the plain
    autograd version (``F.normalize``, ``F.cross_entropy``), so the values are the same."""

    @staticmethod
    def forward(ctx, x, rows, unit: bool, scale: float, symmetric: bool):
        z = x[rows]
        denom = unclamped = None
        if unit:
            z, denom, unclamped = unit_rows(z)
        n = rows.numel() // 2
        logits = mm(z[:n], z[n:].T)
        if scale != 1:
            logits = scale * logits
        target = torch.arange(n, device=x.device)
        log_prob = F.log_softmax(logits, 1)
        ce = F.nll_loss(log_prob, target)
        log_prob_t = None
        if symmetric:
            log_prob_t = F.log_softmax(logits.T, 1)
            ce = 0.5 * (ce + F.nll_loss(log_prob_t, target))
        ctx.unit, ctx.scale, ctx.shape = unit, scale, x.shape
        ctx.save_for_backward(rows, z, log_prob, log_prob_t, denom, unclamped)
        return ce

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        rows, z, log_prob, log_prob_t, denom, unclamped = ctx.saved_tensors
        n = log_prob.shape[0]
        g = log_prob.exp()
        g.diagonal().sub_(1.0)
        if log_prob_t is not None:
            g_t = log_prob_t.exp()
            g_t.diagonal().sub_(1.0)
            g = g.add_(g_t.T).mul_(0.5)
        g = g.mul_(grad * (ctx.scale / n))
        gz = torch.cat([mm(g, z[n:]), mm(g.T, z[:n])])
        if ctx.unit:
            gz = unit_rows_backward(gz, z, denom, unclamped)
        return gz.new_zeros(ctx.shape).index_copy_(0, rows, gz), None, None, None, None


@register("npair")
class NPairLoss(PairLoss):
    """Multi-class N-pair loss (Sohn, NeurIPS 2016), on dot products (embeddings are not normalised):

    ``L = 1/N Σ_i log(1 + Σ_{j≠i} exp(f_iᵀf_j⁺ − f_iᵀf_i⁺)) + λ·¼·(mean‖f_i‖² + mean‖f_i⁺‖²)``,

    computed as ``cross_entropy(A P⁺ᵀ, arange(N))``; the batch holds N classes × 2 samples (anchor f_i =
    first, positive f_i⁺ = second; see :func:`npair_indices`). λ (``l2_reg``) = 0.002 as in the TF-contrib
    and Paddle reference implementations. ``symmetric`` averages with the transposed problem.
    ``normalize=True, scale=25, l2_reg=0`` is the normalised ("tuplet") variant used by SEC.

    With ``indices`` or references, every positive pair (a, p) is a row: ``softplus(LSE_{n∈N_a}(s_an) −
    s_ap)`` averaged over the positive pairs, with the L2 term over the anchors and positives of those pairs.
    """

    def __init__(
        self,
        l2_reg: float = 0.002,
        strict: bool = True,
        symmetric: bool = False,
        normalize: bool = False,
        scale: float = 1.0,
    ):
        super().__init__()
        self.l2_reg, self.strict, self.symmetric = l2_reg, strict, symmetric
        self.normalize, self.scale = normalize, scale

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x) if self.normalize else x

    def compute(self, b: Batch, indices: Indices | None) -> torch.Tensor:
        if indices is None and b.self_ref:
            a, p = npair_indices(b.labels, self.strict)
            if a.numel() < 2:
                return b.x.sum() * 0.0
            # only the 2N rows used are gathered and normalised (row by row: the same values)
            rows = torch.cat([a, p])
            ce = _NPairCrossEntropy.apply(b.x, rows, self.normalize, self.scale, self.symmetric)
            if not self.l2_reg:
                return ce
            anchors, positives = self._embed(b.x[rows]).split(a.numel())
            return ce + self.l2_reg * 0.25 * (anchors.pow(2).sum(1).mean() + positives.pow(2).sum(1).mean())
        x = self._embed(b.x)
        ref = x if b.ref is None else self._embed(b.ref)
        logits = self.scale * gram(x, None if b.ref is None else ref)
        pairs = make_pairs(b, indices)
        per_pair = F.softplus(masked_logsumexp(logits, pairs.neg_add)[:, None] - pairs.positives(logits))
        loss = reduce(per_pair, pairs.pos_w, "mean")
        if self.l2_reg:
            n_pairs = pairs.pos_w.sum().clamp(min=1)
            a_sq = (pairs.pos_w.sum(1) * x.pow(2).sum(1)).sum() / n_pairs
            p_sq = (pairs.pos_w * ref.pow(2).sum(1)[pairs.pos_idx]).sum() / n_pairs
            loss = loss + self.l2_reg * 0.25 * (a_sq + p_sq)
        return loss * pairs.present()

    def extra_repr(self) -> str:
        return (
            f"l2_reg={self.l2_reg}, strict={self.strict}, symmetric={self.symmetric}, "
            f"normalize={self.normalize}, scale={self.scale}"
        )


@register("margin")
class MarginLoss(PairLoss):
    """Margin loss (Wu, Manmatha, Smola & Krähenbühl, ICCV 2017):
    ``ℓ(i, j) = [α + y_ij (D_ij − β_{y_i})]_+`` with y = +1 for positive, −1 for negative pairs and D the
    Euclidean distance of L2-normalised embeddings. Over triplets (a, p, n) (a miner's, e.g.
    ``distance_weighted``; otherwise all triplets from labels/pairs, as PML):

    ``L = (Σ_t ℓ⁺_ap + ℓ⁻_an + ν·Σ_t β_{y_a}) / #{ℓ > 0}`` (the plain sum if that count is 0),

    computed in O(B·R) from per-pair triplet multiplicities. β is an ``nn.Parameter`` (one global, or one
    per class with ``num_classes``; the official code: per class, lr 0.1 SGD); defaults α = 0.2,
    β₀ = 1.2, ν = 0 (official code).
    """

    def __init__(
        self,
        alpha: float = 0.2,
        beta: float = 1.2,
        nu: float = 0.0,
        num_classes: int | None = None,
        learn_beta: bool = True,
    ):
        super().__init__()
        self.alpha, self.nu, self.num_classes = alpha, nu, num_classes
        self.beta = nn.Parameter(torch.full((num_classes or 1,), float(beta)), requires_grad=learn_beta)
        self.distance = make_distance("euclidean", True)

    def compute(self, b: Batch, indices: Indices | None) -> torch.Tensor:
        d = self.matrix(b)
        if self.num_classes is None:
            beta_a = self.beta.to(d.dtype).expand(d.shape[0])
        else:
            lo, hi = int(b.labels.min()), int(b.labels.max())
            if lo < 0 or hi >= self.num_classes:
                raise LabelError(
                    f"per-class beta needs labels in [0, {self.num_classes}), got [{lo}, {hi}]; "
                    "set num_classes to the number of training classes"
                )
            beta_a = self.beta.to(d.dtype)[b.labels]
        pairs, t_a = triplet_multiplicities(b, indices)
        lp = torch.relu(self.alpha + pairs.positives(d) - beta_a[:, None])
        ln = torch.relu(self.alpha - d + beta_a[:, None])
        total = (pairs.pos_w * lp).sum() + (pairs.neg * ln).sum() + self.nu * (t_a * beta_a).sum()
        count = (pairs.pos_w * torch.sign(lp)).sum() + (pairs.neg * torch.sign(ln)).sum()
        return total / torch.where(count > 0, count, torch.ones_like(count))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, nu={self.nu}, num_classes={self.num_classes}"


def triplet_multiplicities(b: Batch, indices: Indices | None) -> tuple[Pairs, torch.Tensor]:
    """For a set of triplets: :class:`Pairs` whose weights count how often each pair appears as (a, p)
    and as (a, n), and the number of triplets per anchor.

    Triplet ``indices`` are counted as given; labels or pairs stand for all triplets (a, p, n) with
    (a, p) positive and (a, n) negative, so ``w(a, p) = |N_a|`` and ``w(a, n) = |P_a|``. Any loss
    separable into ``f(a, p) + g(a, n)`` summed over triplets is then a weighted sum over pairs, O(B·R).
    """
    if indices is not None and len(indices) == 3:
        pairs = make_pairs(b, indices, multiplicity=True)
        a = check_indices(indices, *b.shape)[0].to(b.x.device)
        return pairs, torch.bincount(a, minlength=b.shape[0]).to(b.x.dtype)
    pairs = make_pairs(b, indices)
    n_pos, n_neg = pairs.pos_w.sum(1, keepdim=True), pairs.neg.sum(1, keepdim=True)
    return Pairs(pairs.pos_idx, pairs.pos_w * n_neg, pairs.neg * n_pos), (n_pos * n_neg).squeeze(1)


@register("circle")
class CircleLoss(PairLoss):
    """Circle loss (Sun, Cheng, Zhang, Zhang, Zheng, Wang & Wei, CVPR 2020), on cosine similarity:

    ``L_i = log[1 + Σ_n e^{γ α_n (s_n − Δ_n)} · Σ_p e^{−γ α_p (s_p − Δ_p)}]``, computed as
    ``softplus(LSE_n + LSE_p)``, with ``α_p = [1 + m − s_p]_+``, ``α_n = [s_n + m]_+`` detached,
    ``Δ_p = 1 − m``, ``Δ_n = m``. Mean over anchors with at least one positive and one negative.
    Defaults m = 0.4, γ = 80 (fine-grained retrieval; face recognition 0.25/256, re-id 0.25/128).
    """

    def __init__(self, m: float = 0.4, gamma: float = 80.0):
        super().__init__()
        self.m, self.gamma = m, gamma
        self.distance = make_distance("cosine", True)

    def compute(self, b: Batch, indices: Indices | None) -> torch.Tensor:
        s = self.matrix(b)
        pairs = make_pairs(b, indices)
        sp = pairs.positives(s)
        alpha_p = torch.relu(1 + self.m - sp.detach())
        alpha_n = torch.relu(s.detach() + self.m)
        logit_p = (-self.gamma * alpha_p) * (sp - (1 - self.m))
        logit_n = (self.gamma * alpha_n) * (s - self.m)
        lse = masked_logsumexp(logit_p, pairs.pos_add) + masked_logsumexp(logit_n, pairs.neg_add)
        valid = ((pairs.pos_w.sum(1) > 0) & (pairs.neg.sum(1) > 0)).to(s.dtype)
        return reduce(F.softplus(lse), valid, "mean")

    def extra_repr(self) -> str:
        return f"m={self.m}, gamma={self.gamma}"


class _SupCon(torch.autograd.Function):
    """:class:`SupConLoss` from the similarity matrix ``s [B, R]`` and the pairs, with a hand-written backward:
    for the logits ``l = s/τ``, ``∂/∂l_ij = w_i (e^{l_ij − LSE_i} − 1[j ∈ P_i]/|P_i|)`` over the kept pairs
    (``w_i`` = the anchor's weight in the mean), written into one ``[B, R]`` buffer where autograd would chain
    a dozen ``[B, R]`` operations. The forward runs the same operations as before, so the values are the same.
    """

    @staticmethod
    def forward(ctx, s, pos_idx, pos_w, neg, present, temperature: float):
        logits = s / temperature
        lp = logits.gather(1, pos_idx)
        pos_add = (pos_w.clamp(max=1) - 1) * BIG
        neg_add = (neg.clamp(max=1) - 1) * BIG
        # log Σ_{P∪N} e^{logit} from the positive and negative parts; -BIG (not -inf) keeps every row finite
        lse_p = masked_logsumexp(lp, pos_add).clamp(min=-BIG)
        lse_n = masked_logsumexp(logits, neg_add).clamp(min=-BIG)
        n_pos = pos_w.sum(1).clamp(min=1)
        lse = torch.logaddexp(lse_p, lse_n)
        per_anchor = lse - (lp * pos_w).sum(1) / n_pos
        valid = (pos_w.sum(1) > 0).to(logits.dtype)
        loss = reduce(per_anchor, valid, "mean") * present
        ctx.temperature = temperature
        ctx.save_for_backward(logits, lp, pos_idx, pos_w, pos_add, neg_add, lse, n_pos, valid, present)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        logits, lp, pos_idx, pos_w, pos_add, neg_add, lse, n_pos, valid, present = ctx.saved_tensors
        w = (valid * (grad * present / valid.sum().clamp(min=1)))[:, None]
        g = (logits + neg_add).sub_(lse[:, None]).exp_().mul_(w)
        g_pos = (lp + pos_add).sub_(lse[:, None]).exp_().sub_(pos_w / n_pos[:, None]).mul_(w)
        return g.scatter_add_(1, pos_idx, g_pos).div_(ctx.temperature), None, None, None, None, None


class _SupConLabels(torch.autograd.Function):
    """:class:`SupConLoss` when the pairs come from the labels (no miner). Then ``P_i ∪ N_i`` is every
    reference but the anchor itself, so the denominator is one ``logsumexp`` over the row of ``l = s/τ``
    with the diagonal set to −∞ (a batch compared with itself), no ``[B, R]`` masks are built, and only the
    positives ``pos_idx [B, K]`` (:func:`~deepmetric.losses.base.label_positives`) are indexed. The backward
    is ``∂/∂l_ij = w_i (softmax_ij − 1[j ∈ P_i]/|P_i|)`` with ``w_i`` the anchor's weight in the mean
    (0 without positives; all 0 when the batch holds no negative pair). At B = 128 this is a third of the
    general node's ``[B, R]`` passes, which dominate a step that small on CPU."""

    @staticmethod
    def forward(ctx, s, pos_idx, pos_w, has_negative, self_ref: bool, temperature: float):
        logits = s / temperature
        if self_ref:
            logits.diagonal().fill_(float("-inf"))
        lse = torch.logsumexp(logits, 1)
        n_pos = pos_w.sum(1)
        # from s, not l: a padding slot may point at the −∞ diagonal (−∞ · 0 would be NaN)
        mean_pos = (s.gather(1, pos_idx) * pos_w).sum(1) / (n_pos.clamp(min=1) * temperature)
        valid = (n_pos > 0).to(logits.dtype)
        weight = valid * (has_negative / valid.sum().clamp(min=1))
        ctx.temperature = temperature
        ctx.save_for_backward(logits, lse, pos_idx, pos_w, n_pos, weight)
        return torch.dot(lse - mean_pos, weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        logits, lse, pos_idx, pos_w, n_pos, weight = ctx.saved_tensors
        w = (weight * (grad / ctx.temperature))[:, None]
        g = (logits - lse[:, None]).exp_().mul_(w)
        return g.scatter_add_(1, pos_idx, pos_w.div(n_pos.clamp(min=1)[:, None]).mul_(-w)), None, None, None, None, None


@register("supcon")
class SupConLoss(PairLoss):
    """Supervised contrastive loss (Khosla et al., NeurIPS 2020), L_out form, on cosine similarity:

    ``L_i = −1/|P_i| Σ_{p∈P_i} log( e^{s_ip/τ} / Σ_{a∈P_i∪N_i} e^{s_ia/τ} )``, mean over anchors with a
    positive; 0 without positive or negative pairs. τ = 0.1 (PML; the official code uses 0.07).
    Memory O(B·R), one logsumexp per anchor.
    """

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        self.temperature = temperature
        self.distance = make_distance("cosine", True)

    def compute(self, b: Batch, indices: Indices | None) -> torch.Tensor:
        s = self.matrix(b)
        if indices is None:
            idx, valid = label_positives(b)
            labels = b.labels if b.self_ref else torch.cat([b.labels, b.ref_labels])
            has_negative = (labels != labels[0]).any().to(s.dtype)
            return _SupConLabels.apply(s, idx, valid.to(s.dtype), has_negative, b.self_ref, self.temperature)
        pairs = make_pairs(b, indices)
        return _SupCon.apply(s, pairs.pos_idx, pairs.pos_w, pairs.neg, pairs.present(), self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


@register("ntxent")
class NTXentLoss(PairLoss):
    """NT-Xent / InfoNCE (Chen, Kornblith, Norouzi & Hinton, SimCLR, ICML 2020), on cosine similarity,
    one term per positive pair (a, p) against the negatives of a:

    ``ℓ_ap = −log( e^{s_ap/τ} / (e^{s_ap/τ} + Σ_{n∈N_a} e^{s_an/τ}) ) = softplus(LSE_n(s_an/τ) − s_ap/τ)``,

    mean over positive pairs. τ = 0.1 (SimCLR's ImageNet setting; PML: 0.07). Memory O(B·R) — PML builds
    a (#positive pairs × #negative pairs) matrix, O(B³).

    **Decomposition** (Sors et al. 2021, :meth:`terms`): ``τ·L = L_pos + τ·L_ent`` with the alignment term
    ``L_pos = mean_ap(−s_ap)`` and the entropy term ``L_ent = mean_ap LSE_{j∈{p}∪N_a}(s_aj/τ)``, so the
    temperature is the weight of the entropy term.
    """

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        self.temperature = temperature
        self.distance = make_distance("cosine", True)

    def _parts(self, b: Batch, indices: Indices | None) -> tuple[torch.Tensor, torch.Tensor, Pairs]:
        """Positive-pair logits ``s_ap/τ`` [B, K], the negatives' ``LSE_n(s_an/τ)`` [B] and the pairs."""
        logits = self.matrix(b) / self.temperature
        pairs = make_pairs(b, indices)
        return pairs.positives(logits), masked_logsumexp(logits, pairs.neg_add), pairs

    def compute(self, b: Batch, indices: Indices | None) -> torch.Tensor:
        lp, lse_n, pairs = self._parts(b, indices)
        per_pair = F.softplus(lse_n[:, None] - lp)
        return reduce(per_pair, pairs.pos_w, "mean") * pairs.present()

    def compute_terms(self, b: Batch, indices: Indices | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L_pos, L_ent)`` with ``loss = L_pos / τ + L_ent`` (0, 0 without positive or negative pairs)."""
        lp, lse_n, pairs = self._parts(b, indices)
        present = pairs.present()
        # finite stand-ins where a row has no positive (masked out by the weights) or no negative (−inf)
        lp = lp * pairs.pos_w
        ent = torch.logaddexp(lp, lse_n.clamp(min=-BIG)[:, None])
        pos = reduce(-lp * self.temperature, pairs.pos_w, "mean")
        return pos * present, reduce(ent, pairs.pos_w, "mean") * present

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
