"""Pair-based losses: contrastive, triplet, N-pair, margin, multi-similarity, circle, SupCon, NT-Xent.

All take ``(embeddings [B, D], labels [B], indices=None, ref_embeddings=None, ref_labels=None)`` and
return a scalar. ``indices`` are pairs ``(a1, p, a2, n)`` or triplets ``(a, p, n)`` from any miner;
``ref_embeddings``/``ref_labels`` replace the batch as the other side of each pair (cross-batch memory).
Everything is computed on one ``[B, R]`` similarity/distance matrix with masks; half precision is
computed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepmetric.distances import gram
from deepmetric.errors import ConfigError, InputError, LabelError
from deepmetric.losses import register
from deepmetric.losses.base import (
    Batch,
    Indices,
    PairLoss,
    Reduction,
    both_present,
    check_indices,
    check_reduction,
    make_distance,
    masked_logsumexp,
    padded_rows,
    pair_masks,
    reduce,
)


def multi_similarity_mining(
    sim: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-similarity pair mining (Wang et al., CVPR 2019) on a similarity matrix.

    Keeps negative ``n`` of anchor ``i`` if ``s_in + ε > min_{p∈P_i} s_ip`` and positive ``p`` if
    ``s_ip − ε < max_{n∈N_i} s_in``, min and max over the unmined candidate sets ``pos``/``neg``.
    """
    with torch.no_grad():
        inf = torch.tensor(float("inf"), dtype=sim.dtype, device=sim.device)
        min_pos = torch.where(pos, sim, inf).amin(1, keepdim=True)
        max_neg = torch.where(neg, sim, -inf).amax(1, keepdim=True)
        return pos & (sim - epsilon < max_neg), neg & (sim + epsilon > min_pos)


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
        pos, neg = pair_masks(b, indices)
        if self.parity:
            pos = pos & (sim.detach() < 1 - 1e-5)
        if self.mining:
            pos, neg = multi_similarity_mining(sim.detach(), pos, neg, self.epsilon)
        pos_term = masked_logsumexp(-self.alpha * (sim - self.base), pos, add_one=True) / self.alpha
        neg_term = masked_logsumexp(self.beta * (sim - self.base), neg, add_one=True) / self.beta
        per_anchor = pos_term + neg_term
        if self.parity:
            per_anchor = per_anchor * (pos.any(1) & neg.any(1))
        return per_anchor.sum() / sim.shape[0] * both_present(pos, neg)

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, beta={self.beta}, base={self.base}, epsilon={self.epsilon}, "
            f"mining={self.mining}, parity={self.parity}"
        )


@register("contrastive")
class ContrastiveLoss(PairLoss):
    """Contrastive loss (Hadsell, Chopra & LeCun, CVPR 2006), in the two-margin library form.

    On a distance d: ``ℓ⁺ = [d − m_pos]_+^p``, ``ℓ⁻ = [m_neg − d]_+^p``; on a similarity s (``distance=
    "cosine"``): ``ℓ⁺ = [m_pos − s]_+^p``, ``ℓ⁻ = [s − m_neg]_+^p``. The paper's form
    ``(1−Y)·½d² + Y·½[m − d]_+²`` is ½ × (``power=2, pos_margin=0, neg_margin=m``, ``reduction="sum"``).

    Margins default to (0, 1) on a distance (PML; L2-normalised Euclidean) and to (0.9, 0.6) on cosine
    (ROADMAP's calibration loss). Reductions: ``mean`` over all pairs; ``avg_nonzero`` = mean of the
    non-zero ℓ⁺ + mean of the non-zero ℓ⁻ (PML's default); ``sum``. 0 without positive or negative pairs.
    """

    def __init__(
        self,
        pos_margin: float | None = None,
        neg_margin: float | None = None,
        power: int = 1,
        distance: str = "euclidean",
        normalize: bool = True,
        reduction: Reduction = "mean",
    ):
        super().__init__()
        if power not in (1, 2):
            raise ConfigError(f"power must be 1 or 2, got {power}")
        self.distance = make_distance(distance, normalize)
        sim = self.distance.is_similarity
        self.pos_margin = (0.9 if sim else 0.0) if pos_margin is None else float(pos_margin)
        self.neg_margin = (0.6 if sim else 1.0) if neg_margin is None else float(neg_margin)
        self.power = power
        self.reduction = check_reduction(reduction)

    def compute(self, b: Batch, indices: Indices | None) -> torch.Tensor:
        m = self.matrix(b)
        pos, neg = pair_masks(b, indices)
        sign = -1.0 if self.distance.is_similarity else 1.0
        lp = torch.relu(sign * (m - self.pos_margin))
        ln = torch.relu(sign * (self.neg_margin - m))
        if self.power == 2:
            lp, ln = lp * lp, ln * ln
        if self.reduction == "avg_nonzero":
            out = reduce(lp, pos, "avg_nonzero") + reduce(ln, neg, "avg_nonzero")
        else:
            out = reduce(torch.where(pos, lp, ln), pos | neg, self.reduction)
        return out * both_present(pos, neg)

    def extra_repr(self) -> str:
        return (
            f"pos_margin={self.pos_margin}, neg_margin={self.neg_margin}, power={self.power}, "
            f"distance={self.distance}, reduction={self.reduction!r}"
        )


def all_triplet_values(
    dist: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``d_ap − d_an`` for every triplet allowed by the masks, as ``[B, K, R]`` with its validity mask.

    K is the largest number of positives of an anchor, so memory is B·K·R (B³ only if one class fills
    the batch); p and n are coupled only through the anchor, the way PML converts pairs to triplets.
    """
    p_idx, p_valid = padded_rows(pos)
    d_ap = dist.gather(1, p_idx)
    values = d_ap[:, :, None] - dist[:, None, :]
    return values, p_valid[:, :, None] & neg[:, None, :]


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
        dist = self.distance.dissimilarity(b.x, b.ref)
        if indices is not None and len(indices) == 3:
            a, p, n = (t.to(dist.device) for t in check_indices(indices, *b.shape))
            values = dist[a, p] - dist[a, n]
            valid = torch.ones_like(values, dtype=torch.bool)
        else:
            values, valid = all_triplet_values(dist, *pair_masks(b, indices))
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
    sorted_labels = labels[order]
    _, counts = torch.unique_consecutive(sorted_labels, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    if strict and not bool((counts == 2).all()):
        bad = torch.unique_consecutive(sorted_labels)[counts != 2][:5].tolist()
        raise InputError(
            "the N-pair loss needs exactly 2 samples of each class in the batch (an anchor and a "
            f"positive); classes {bad} have {counts[counts != 2][:5].tolist()}. Build batches with "
            "deepmetric.samplers_npair.NPairBatchSampler, or pass strict=False to use the first two "
            "samples of each class and ignore singletons"
        )
    keep = counts >= 2
    return order[starts[keep]], order[starts[keep] + 1]


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

    def compute(self, b: Batch, indices: Indices | None) -> torch.Tensor:
        x = F.normalize(b.x, dim=1) if self.normalize else b.x
        if indices is None and b.self_ref:
            a, p = npair_indices(b.labels, self.strict)
            anchors, positives = x[a], x[p]
            if a.numel() < 2:
                return x.sum() * 0.0
            logits = self.scale * (anchors @ positives.T)
            target = torch.arange(a.numel(), device=x.device)
            ce = F.cross_entropy(logits, target)
            if self.symmetric:
                ce = 0.5 * (ce + F.cross_entropy(logits.T, target))
            return ce + self.l2_reg * 0.25 * (anchors.pow(2).sum(1).mean() + positives.pow(2).sum(1).mean())
        ref = x if b.ref is None else (F.normalize(b.ref, dim=1) if self.normalize else b.ref)
        logits = self.scale * gram(x) if b.ref is None else self.scale * (x @ ref.T)
        pos, neg = pair_masks(b, indices)
        per_pair = F.softplus(masked_logsumexp(logits, neg)[:, None] - logits)
        n_pos = pos.sum().clamp(min=1)
        sq_x, sq_r = x.pow(2).sum(1), ref.pow(2).sum(1)
        reg = ((pos.sum(1) * sq_x).sum() + (pos.sum(0) * sq_r).sum()) / n_pos
        loss = reduce(per_pair, pos, "mean") + self.l2_reg * 0.25 * reg
        return loss * both_present(pos, neg)

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
        w_pos, w_neg, t_a = triplet_multiplicities(b, indices, d.dtype)
        lp = torch.relu(self.alpha + d - beta_a[:, None])
        ln = torch.relu(self.alpha - d + beta_a[:, None])
        total = (w_pos * lp).sum() + (w_neg * ln).sum() + self.nu * (t_a * beta_a).sum()
        count = (w_pos * (lp > 0)).sum() + (w_neg * (ln > 0)).sum()
        return total / torch.where(count > 0, count, torch.ones_like(count))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, nu={self.nu}, num_classes={self.num_classes}"


def triplet_multiplicities(
    b: Batch, indices: Indices | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For a triplet set: how often each pair appears as (a, p) and as (a, n), and triplets per anchor.

    Triplet ``indices`` are counted as given; labels or pairs stand for all triplets (a, p, n) with
    (a, p) positive and (a, n) negative, so ``w_pos[a, p] = |N_a|``, ``w_neg[a, n] = |P_a|``.
    Any loss separable into ``f(a, p) + g(a, n)`` summed over triplets is a weighted sum over pairs.
    """
    n_a, n_r = b.shape
    dev = b.x.device
    if indices is not None and len(indices) == 3:
        a, p, n = (t.to(dev) for t in check_indices(indices, n_a, n_r))
        ones = torch.ones(a.numel(), dtype=dtype, device=dev)
        w_pos = torch.zeros(n_a, n_r, dtype=dtype, device=dev).index_put_((a, p), ones, accumulate=True)
        w_neg = torch.zeros(n_a, n_r, dtype=dtype, device=dev).index_put_((a, n), ones, accumulate=True)
        return w_pos, w_neg, torch.bincount(a, minlength=n_a).to(dtype)
    pos, neg = pair_masks(b, indices)
    n_pos, n_neg = pos.sum(1, keepdim=True).to(dtype), neg.sum(1, keepdim=True).to(dtype)
    return pos * n_neg, neg * n_pos, (n_pos * n_neg).squeeze(1)


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
        pos, neg = pair_masks(b, indices)
        sd = s.detach()
        logit_p = -self.gamma * torch.relu(1 + self.m - sd) * (s - (1 - self.m))
        logit_n = self.gamma * torch.relu(sd + self.m) * (s - self.m)
        per_anchor = F.softplus(masked_logsumexp(logit_p, pos) + masked_logsumexp(logit_n, neg))
        return reduce(per_anchor, pos.any(1) & neg.any(1), "mean")

    def extra_repr(self) -> str:
        return f"m={self.m}, gamma={self.gamma}"


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
        logits = self.matrix(b) / self.temperature
        pos, neg = pair_masks(b, indices)
        log_denominator = masked_logsumexp(logits, pos | neg)
        n_pos = pos.sum(1)
        pos_logit_sum = torch.where(pos, logits, torch.zeros_like(logits)).sum(1)
        has_pos = n_pos > 0
        safe_denominator = torch.where(has_pos, log_denominator, torch.zeros_like(log_denominator))
        per_anchor = safe_denominator - pos_logit_sum / n_pos.clamp(min=1)
        return reduce(per_anchor, has_pos, "mean") * both_present(pos, neg)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


@register("ntxent")
class NTXentLoss(PairLoss):
    """NT-Xent / InfoNCE (Chen, Kornblith, Norouzi & Hinton, SimCLR, ICML 2020), on cosine similarity,
    one term per positive pair (a, p) against the negatives of a:

    ``ℓ_ap = −log( e^{s_ap/τ} / (e^{s_ap/τ} + Σ_{n∈N_a} e^{s_an/τ}) ) = softplus(LSE_n(s_an/τ) − s_ap/τ)``,

    mean over positive pairs. τ = 0.1 (SimCLR's ImageNet setting; PML: 0.07). Memory O(B·R) — PML builds
    a (#positive pairs × #negative pairs) matrix, O(B³).
    """

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        self.temperature = temperature
        self.distance = make_distance("cosine", True)

    def compute(self, b: Batch, indices: Indices | None) -> torch.Tensor:
        logits = self.matrix(b) / self.temperature
        pos, neg = pair_masks(b, indices)
        per_pair = F.softplus(masked_logsumexp(logits, neg)[:, None] - logits)
        return reduce(per_pair, pos, "mean") * both_present(pos, neg)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
