"""Proxy- and classifier-based losses: Proxy-Anchor, Proxy-NCA, ProxyNCA++, normalised softmax, ArcFace,
CosFace, SoftTriple, the cross-entropy recipe of Boudiaf et al. and Multi-Proxy Anchor.

All take ``(embeddings [B, D], labels [B], indices=None)`` and return a scalar. Every loss is built with
``num_classes`` (C) and ``embedding_size`` (D) — the trainer fills both in — and keeps its learnable
class representatives in ``self.proxies``: an ``nn.Parameter`` of shape ``[C, D]``, or ``[C·K, D]`` with
K proxies per class stored class-major (proxy ``c·K + k`` belongs to class ``c``). Labels must be
``0..C-1`` (the trainer remaps training labels). Proxies usually need a larger learning rate than the
network: set ``optimizer.loss_lr_mult`` (Proxy-Anchor: 100).

Logits and log-sum-exps are computed in float32 with autocast disabled, even for half-precision inputs.
Mined ``indices`` are not used by these losses (they compare samples with proxies, not with each other)
and are refused with a clear error, as is a cross-batch memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from deepmetric.distances import as_compute_dtype, full_precision
from deepmetric.errors import ConfigError, InputError, LabelError
from deepmetric.matmul import mm
from deepmetric.losses import register
from deepmetric.losses.base import masked_logsumexp
from deepmetric.validation import check_embeddings, check_labels


def smoothed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Mean cross-entropy ``−Σ_c t_c log softmax(logits)_c`` against the smoothed target
    ``t = 1 − ε`` on the true class and ``ε/(C − 1)`` on each other class (Boudiaf et al. 2020;
    ProxyNCA++'s ``binarize_and_smooth_labels``). Not torch's ``label_smoothing``, which gives ``ε/C`` to
    every class. It differs from ``KL(t ‖ softmax)`` by the constant entropy ``H(t)``, so the gradients
    are the same; its minimum, at ``softmax = t``, is ``H(t)``. ``ε = 0`` is plain cross-entropy.
    """
    if epsilon == 0:
        return F.cross_entropy(logits, labels)
    c = logits.shape[1]
    log_p = F.log_softmax(logits, dim=1)
    true = log_p.gather(1, labels[:, None]).squeeze(1)
    others = log_p.sum(1) - true
    return -((1 - epsilon) * true + epsilon / (c - 1) * others).mean()


def _reference_proxy_anchor(sim: torch.Tensor, labels: torch.Tensor, alpha: float, delta: float) -> torch.Tensor:
    """Proxy-Anchor by plain autograd (masked log-sum-exps); twice differentiable."""
    pos = torch.zeros_like(sim, dtype=torch.bool).scatter_(1, labels[:, None], True)
    pos_term = masked_logsumexp(-alpha * (sim - delta), pos, dim=0, add_one=True)
    neg_term = masked_logsumexp(alpha * (sim + delta), ~pos, dim=0, add_one=True)
    n_with_pos = pos.any(0).sum().clamp(min=1)
    return pos_term.sum() / n_with_pos + neg_term.sum() / sim.shape[1]


def _reference_cosine(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=1) @ F.normalize(w, dim=1).T


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Σ_d a[n, d] b[n, d]`` per row. Large operands go through a batched ``[1, D] @ [D, 1]`` product,
    which needs no ``[N, D]`` temporary: at 11,318 proxies x 512 its fresh pages cost more than the
    arithmetic. Small ones take ``vecdot`` (fewer dispatches)."""
    if a.numel() < 1 << 20:
        return torch.linalg.vecdot(a, b)
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _differentiable_backward(reference, inputs: tuple, grad: torch.Tensor, needs: tuple) -> tuple:
    """Backward of a hand-differentiated function when a graph of the backward is asked for
    (``create_graph=True``, e.g. a Hessian): the gradient of ``reference(*inputs)``, itself differentiable."""
    wrt = [t for t, n in zip(inputs, needs) if n]
    grads = iter(torch.autograd.grad(reference(*inputs), wrt, grad, create_graph=True))
    return tuple(next(grads) if n else None for n in needs)


class _ProxyAnchor(torch.autograd.Function):
    """Proxy-Anchor's two terms on ``sim [B, C]`` with a hand-written backward.

    Each sample has exactly one positive column (its label), so the positive term touches only the B
    gathered similarities (per-class log-sum-exps by scatter), and the negative term is one ``[B, C]``
    exponential with the positives zeroed. Every log-sum-exp is shifted by its (column or class) maximum,
    clamped at 0 for the ``1 +``, so any α is stable. Memory: one saved ``[B, C]`` buffer.
    """

    @staticmethod
    def forward(ctx, sim: torch.Tensor, labels: torch.Tensor, alpha: float, delta: float) -> torch.Tensor:
        n_cls = sim.shape[1]
        col = labels[:, None]
        e = torch.mul(sim, alpha).add_(alpha * delta).scatter_(1, col, float("-inf"))  # α(s + δ), negatives only
        m = e.amax(0).clamp_(min=0)
        e.sub_(m).exp_()
        neg_den = e.sum(0).add_(torch.exp(-m))  # e^{−m} + Σ e^{z − m}: log(1 + Σ e^z) = m + log(...)
        neg = (m + torch.log(neg_den)).sum() / n_cls
        zp = sim.gather(1, col).squeeze(1).sub(delta).mul_(-alpha)  # −α(s_pos − δ), [B]
        mp = torch.zeros(n_cls, dtype=sim.dtype, device=sim.device).scatter_reduce_(0, labels, zp, "amax")
        ep = torch.exp(zp - mp[labels])
        pos_den = torch.exp(-mp).index_add_(0, labels, ep)
        present = torch.zeros(n_cls, dtype=torch.bool, device=sim.device).index_fill_(0, labels, True)
        n_pos = present.sum().clamp(min=1)
        pos = ((mp + torch.log(pos_den)) * present).sum() / n_pos
        ctx.save_for_backward(sim, e, neg_den, labels, ep, pos_den, n_pos)
        ctx.alpha, ctx.delta = alpha, delta
        return pos + neg

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        sim, e, neg_den, labels, ep, pos_den, n_pos = ctx.saved_tensors
        a = ctx.alpha
        if torch.is_grad_enabled():
            (g,) = _differentiable_backward(lambda s: _reference_proxy_anchor(s, labels, a, ctx.delta), (sim,), grad, (True,))
            return g, None, None, None
        g = e * (grad * a / e.shape[1] / neg_den)  # ∂/∂s of the negative term (0 at the positives)
        g_pos = ep / pos_den[labels] * (-a * grad / n_pos)
        g.scatter_(1, labels[:, None], g_pos[:, None])
        return g, None, None, None


def proxy_anchor_terms(sim: torch.Tensor, labels: torch.Tensor, alpha: float, delta: float) -> torch.Tensor:
    """Proxy-Anchor on a sample-to-class similarity matrix ``sim [B, C]`` (see :class:`ProxyAnchorLoss`)."""
    return _ProxyAnchor.apply(sim, labels, alpha, delta)


class _Cosine(torch.autograd.Function):
    """``cos[b, p] = x_bᵀw_p / (‖x_b‖ ‖w_p‖)`` as ``x̂ wᵀ`` with the columns divided by ``‖w_p‖`` in place, and a
    hand-written backward; no normalised copy of the proxies is made or stored, and each direction makes
    one ``[B, P]`` pass besides the products (the ``1/‖x_b‖`` goes on the ``[B, D]`` side). With
    ``G' = G / (‖x_b‖ ‖w_p‖)``, ``u = G'w`` and ``v = G'ᵀx``: ``∂x = u − (x·u / ‖x‖²) x`` and
    ``∂w = v − (w·v / ‖w‖²) w`` (``x·u = Σ_p G∘cos``, so no other ``[B, P]`` pass is needed)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x_norm = x.norm(dim=1).clamp_(min=1e-12)  # as F.normalize: v / max(‖v‖, 1e-12)
        w_norm = w.norm(dim=1).clamp_(min=1e-12)
        cos = mm(x / x_norm[:, None], w.T).div_(w_norm)
        ctx.save_for_backward(x, x_norm, w, w_norm)
        return cos

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, x_norm, w, w_norm = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _differentiable_backward(_reference_cosine, (x, w), grad, ctx.needs_input_grad)
        g = grad / w_norm  # G / ‖w_p‖; the 1 / ‖x_b‖ goes on the [B, D] side
        gx = gw = None
        if ctx.needs_input_grad[0]:
            u = mm(g, w).div_(x_norm[:, None])
            gx = u.addcmul_(x, (_rowdot(x, u) / x_norm.square())[:, None], value=-1)
        if ctx.needs_input_grad[1]:
            v = mm(g.T, x / x_norm[:, None])
            gw = v.addcmul_(w, (_rowdot(w, v) / w_norm.square())[:, None], value=-1)
        return gx, gw


def cosine_to_proxies(x: torch.Tensor, proxies: torch.Tensor) -> torch.Tensor:
    """``x̂ ŵᵀ`` in ``x``'s dtype (float32 or float64): cosine similarity to each proxy, ``[B, P]``."""
    return _Cosine.apply(x, proxies.to(x.dtype))


# a target-logit margin: similarities of the samples to their own class -> (modified logits, derivative)
Target = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None


def _reference_softmax_ce(sim: torch.Tensor, labels: torch.Tensor, scale: float, target: Target) -> torch.Tensor:
    col = labels[:, None]
    logits = sim if target is None else sim.scatter(1, col, target(sim.gather(1, col))[0])
    return F.cross_entropy(scale * logits, labels)


class _SoftmaxCE(torch.autograd.Function):
    """``cross_entropy(scale · logits, y)`` where ``logits = sim`` except the target column,
    ``target(sim[b, y_b])``; one ``[B, C]`` buffer holds the logits, then their log-softmax (one fused
    kernel), which the hand-written backward turns into ``(p − onehot) · scale / B`` (the target column
    times the target's derivative). Four ``[B, C]`` passes in all: on CPU each costs a parallel region,
    which at small B dominates the step."""

    @staticmethod
    def forward(ctx, sim: torch.Tensor, labels: torch.Tensor, scale: float, target: Target) -> torch.Tensor:
        z = sim * scale
        slope = None
        if target is not None:
            col = labels[:, None]
            value, slope = target(sim.gather(1, col).squeeze(1))
            z.scatter_(1, col, (value * scale)[:, None])
        log_p = torch.log_softmax(z, 1)
        ctx.save_for_backward(sim, labels, slope, log_p)
        ctx.scale, ctx.target = scale, target
        return F.nll_loss(log_p, labels)  # −mean_b log_p[b, y_b] in one operation

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        sim, labels, slope, log_p = ctx.saved_tensors
        scale, target = ctx.scale, ctx.target
        if torch.is_grad_enabled():
            (g,) = _differentiable_backward(lambda s: _reference_softmax_ce(s, labels, scale, target), (sim,), grad, (True,))
            return g, None, None, None
        return _logit_grad(log_p, labels, slope, grad * (scale / sim.shape[0])), None, None, None


def _logit_grad(log_p: torch.Tensor, labels: torch.Tensor, slope: torch.Tensor | None, c: torch.Tensor) -> torch.Tensor:
    """``∂L/∂sim`` of the mean softmax cross-entropy from its log-softmax: ``c·(p − onehot(y))``, the target
    column times the margin's derivative ``slope`` where there is one (``c`` = upstream gradient · scale / B)."""
    col = labels[:, None]
    g = torch.exp(log_p)
    if slope is None:  # c·p everywhere, then −c on the target column: no gather of p_y
        return g.mul_(c).scatter_add_(1, col, (-c).expand(col.shape))
    g_y = (g.gather(1, col) - 1).mul_(c * slope[:, None])
    return g.mul_(c).scatter_(1, col, g_y)


def softmax_cross_entropy(sim: torch.Tensor, labels: torch.Tensor, scale: float, target: Target = None) -> torch.Tensor:
    """Mean ``cross_entropy(scale · logits, labels)``, ``logits = sim`` with the target column replaced by
    ``target(sim[b, y_b])[0]`` (a margin; ``None`` = unchanged); ``target`` also returns its derivative.
    Equals the plain autograd composition."""
    return _SoftmaxCE.apply(sim, labels, float(scale), target)


class _CosineSoftmaxCE(torch.autograd.Function):
    """:func:`softmax_cross_entropy` of :func:`cosine_to_proxies` in one node. The operands are normalised
    before the product (``x̂ ŵᵀ``; ``[B, D]`` and ``[C, D]`` passes instead of ``[B, C]`` ones), the cosines
    become logits in place, and the backward reuses the softmax buffer for ``∂/∂cos``, then ``∂x̂ = G ŵ``,
    ``∂ŵ = Gᵀ x̂`` and the normalisations' backward ``(∂v̂ − v̂ (v̂·∂v̂)) / ‖v‖``. Against the two nodes this
    saves most ``[B, C]`` passes and allocations, which at C = 11,318 are the work besides the products; the
    cosines can differ from ``x ŵᵀ / ‖x‖`` in the last bit."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, scale: float, target: Target):
        x_norm = x.norm(dim=1, keepdim=True).clamp_(min=1e-12)  # as F.normalize: v / max(‖v‖, 1e-12)
        w_norm = w.norm(dim=1, keepdim=True).clamp_(min=1e-12)
        x_hat, w_hat = x / x_norm, w / w_norm
        z = mm(x_hat, w_hat.T)
        slope = None
        if target is not None:
            col = labels[:, None]
            value, slope = target(z.gather(1, col).squeeze(1))
        z.mul_(scale)
        if target is not None:
            z.scatter_(1, col, (value * scale)[:, None])
        log_p = torch.log_softmax(z, 1, out=z)  # in place: one [B, C] buffer fewer
        ctx.save_for_backward(x, w, x_hat, x_norm, w_hat, w_norm, labels, slope, log_p)
        ctx.scale, ctx.target = scale, target
        return F.nll_loss(log_p, labels)  # −mean_b log_p[b, y_b] in one operation

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w, x_hat, x_norm, w_hat, w_norm, labels, slope, log_p = ctx.saved_tensors
        scale, target = ctx.scale, ctx.target
        if torch.is_grad_enabled():
            return *_differentiable_backward(
                lambda a, b: _reference_softmax_ce(_reference_cosine(a, b), labels, scale, target),
                (x, w), grad, ctx.needs_input_grad[:2]), None, None, None
        g = _logit_grad(log_p, labels, slope, grad * (scale / x.shape[0]))  # ∂/∂cos
        gx = gw = None
        if ctx.needs_input_grad[0]:
            u = mm(g, w_hat)
            gx = u.addcmul_(x_hat, _rowdot(x_hat, u)[:, None], value=-1).div_(x_norm)
        if ctx.needs_input_grad[1]:
            v = mm(g.T, x_hat)
            gw = v.addcmul_(w_hat, _rowdot(w_hat, v)[:, None], value=-1).div_(w_norm)
        return gx, gw, None, None, None


def cosine_softmax_cross_entropy(
    x: torch.Tensor, proxies: torch.Tensor, labels: torch.Tensor, scale: float, target: Target = None
) -> torch.Tensor:
    """``softmax_cross_entropy(cosine_to_proxies(x, proxies), labels, scale, target)`` in one node (fewer
    ``[B, C]`` passes)."""
    return _CosineSoftmaxCE.apply(x, proxies.to(x.dtype), labels, float(scale), target)


class ProxyLoss(nn.Module):
    """Base of the proxy losses: checks the inputs and calls ``self.compute(x, labels)`` in float32.

    Subclasses create ``self.proxies`` (``[C·K, D]``) and implement :meth:`compute`.
    """

    proxies: nn.Parameter
    uses_references = False  # compares samples with proxies: no mined indices, no cross-batch memory

    def __init__(self, num_classes: int, embedding_size: int, proxies_per_class: int = 1):
        super().__init__()
        for name, value in (
            ("num_classes", num_classes),
            ("embedding_size", embedding_size),
            ("proxies_per_class", proxies_per_class),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.proxies_per_class = proxies_per_class

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices: tuple[torch.Tensor, ...] | None = None,
        ref_embeddings: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        name = type(self).__name__
        if indices is not None:
            raise ConfigError(
                f"{name} compares samples with proxies and does not use mined indices; "
                "remove the miner (miner.name=null)"
            )
        if ref_embeddings is not None or ref_labels is not None:
            raise ConfigError(f"{name} does not use a cross-batch memory; set memory.size=0")
        check_embeddings(embeddings)
        check_labels(labels, embeddings.shape[0])
        if embeddings.shape[1] != self.embedding_size:
            raise InputError(
                f"{name} was built with embedding_size={self.embedding_size} but got embeddings of "
                f"dimension {embeddings.shape[1]}; build the loss with embedding_size={embeddings.shape[1]}"
            )
        labels = labels.to(embeddings.device).long()
        if labels.numel():
            lo, hi = torch.aminmax(labels)
            lo, hi = int(lo), int(hi)
            if lo < 0 or hi >= self.num_classes:
                raise LabelError(
                    f"{name} has {self.num_classes} classes, so labels must lie in [0, {self.num_classes}), "
                    f"got [{lo}, {hi}]; remap labels to 0..C-1 or build the loss with a larger num_classes"
                )
        with full_precision(embeddings.device.type):
            return self.compute(as_compute_dtype(embeddings), labels)

    def compute(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def cosine(self, x: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each embedding to each proxy, ``[B, C·K]``, float32."""
        return cosine_to_proxies(x, self.proxies)

    def extra_repr(self) -> str:
        names = ["num_classes", "embedding_size"] + (["proxies_per_class"] if self.proxies_per_class > 1 else [])
        return ", ".join(f"{k}={getattr(self, k)}" for k in names + list(self.hyper_parameters))

    hyper_parameters: tuple[str, ...] = ()


@register("proxy_anchor")
class ProxyAnchorLoss(ProxyLoss):
    """Proxy-Anchor loss (Kim, Kim, Cho & Kwak, CVPR 2020), with s the cosine similarity:

    ``L = 1/|P⁺| Σ_{p∈P⁺} log(1 + Σ_{x∈X_p⁺} e^{−α(s(x,p) − δ)}) + 1/|P| Σ_{p∈P} log(1 + Σ_{x∈X_p⁻} e^{α(s(x,p) + δ)})``

    P⁺: proxies with at least one positive in the batch; P: all C proxies. Defaults α = 32, δ = 0.1 and
    the initialisation (``kaiming_normal_``, fan-out) follow the official code; train the proxies with
    100× the base learning rate (``optimizer.loss_lr_mult=100``). Each proxy column is a masked
    log-sum-exp, so it is stable in any precision. Equals PML's ``ProxyAnchorLoss(margin=δ, alpha=α)``.
    """

    hyper_parameters = ("alpha", "delta")

    def __init__(self, num_classes: int, embedding_size: int, alpha: float = 32.0, delta: float = 0.1):
        super().__init__(num_classes, embedding_size)
        self.alpha, self.delta = float(alpha), float(delta)
        self.proxies = nn.Parameter(fan_out_normal(num_classes, embedding_size))

    def compute(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return proxy_anchor_terms(self.cosine(x), labels, self.alpha, self.delta)


def fan_out_normal(rows: int, cols: int) -> torch.Tensor:
    """Proxy-Anchor's initialisation: ``randn`` then ``kaiming_normal_(mode="fan_out")`` on ``[rows, cols]``."""
    w = torch.randn(rows, cols)
    nn.init.kaiming_normal_(w, mode="fan_out")
    return w


def _reference_relaxed(sim: torch.Tensor, k: int, gamma: float) -> torch.Tensor:
    s = sim.view(sim.shape[0], -1, k)
    return (torch.softmax(s / gamma, dim=2) * s).sum(2)


class _Relaxed(torch.autograd.Function):
    """:func:`relaxed_class_similarity` with the hand-written backward
    ``∂S_c/∂s_ck = w_ck (1 + (s_ck − S_c)/γ)``, ``w = softmax_k(s/γ)`` (one saved ``[B, C, K]`` buffer)."""

    @staticmethod
    def forward(ctx, sim: torch.Tensor, k: int, gamma: float) -> torch.Tensor:
        s = sim.view(sim.shape[0], -1, k)
        w = s / gamma
        w.sub_(w.amax(2, keepdim=True)).exp_()
        w.div_(w.sum(2, keepdim=True))
        out = torch.linalg.vecdot(w, s)
        ctx.save_for_backward(sim, w, out)
        ctx.k, ctx.gamma = k, gamma
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        sim, w, out = ctx.saved_tensors
        k, gamma = ctx.k, ctx.gamma
        if torch.is_grad_enabled():
            (g,) = _differentiable_backward(lambda t: _reference_relaxed(t, k, gamma), (sim,), grad, (True,))
            return g, None, None
        g = sim.view(w.shape) - out[..., None]
        g.mul_(1 / gamma).add_(1).mul_(w).mul_(grad[..., None])
        return g.view(sim.shape), None, None


def relaxed_class_similarity(sim: torch.Tensor, k: int, gamma: float) -> torch.Tensor:
    """SoftTriple's relaxed similarity to each class from ``sim [B, C·K]`` (class-major):
    ``S_c = Σ_k softmax_k(s_ck / γ) · s_ck``, ``[B, C]``. γ → 0 gives ``max_k s_ck``; K = 1 gives ``s``."""
    if k == 1:
        return sim
    return _Relaxed.apply(sim, k, float(gamma))


def check_classes(num_classes: int, name: str) -> None:
    if isinstance(num_classes, int) and not isinstance(num_classes, bool) and num_classes < 2:
        raise ConfigError(f"{name} needs at least 2 classes (its denominator sums over the other classes)")


@register("proxy_nca")
class ProxyNCALoss(ProxyLoss):
    """Proxy-NCA (Movshovitz-Attias, Toshev, Leung, Ioffe & Singh, ICCV 2017), with
    ``d(x, p) = ‖x̂ − p̂‖²`` on L2-normalised embeddings and proxies:

    ``ℓ = −log( e^{−d(x, p_y)} / Σ_{c≠y} e^{−d(x, p_c)} )``, mean over the batch.

    The positive proxy is excluded from the denominator, so the loss can be negative (C = 2:
    ``ℓ = d_pos − d_neg``). No temperature. Proxies are initialised as ``randn / 8`` (as ProxyNCA++'s
    re-implementation). For the softmax form with a temperature, use ``proxy_nca_pp``.
    """

    def __init__(self, num_classes: int, embedding_size: int):
        check_classes(num_classes, "proxy_nca")
        super().__init__(num_classes, embedding_size)
        self.proxies = nn.Parameter(torch.randn(num_classes, embedding_size) / 8)

    def compute(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = -(2 - 2 * self.cosine(x))  # −‖x̂ − p̂‖²
        pos = F.one_hot(labels, self.num_classes).bool()
        positive = logits.gather(1, labels[:, None]).squeeze(1)
        return (masked_logsumexp(logits, ~pos) - positive).mean()


@register("proxy_nca_pp")
class ProxyNCAPPLoss(ProxyLoss):
    """ProxyNCA++ (Teh, DeVries & Taylor, ECCV 2020):

    ``ℓ = −log softmax_c(−‖x̂ − p̂_c‖² / T)_y``, mean over the batch — the positive is in the denominator,
    and the temperature T = 1/9 (the official code scales x̂ and p̂ by √(1/T) = 3), so this equals
    ``cross_entropy(2·cos / T, y)``. ``epsilon`` > 0 smooths the target as the official code does
    (``1 − ε`` on the true class, ``ε/(C − 1)`` elsewhere; default 0). Proxies ``randn / 8``.
    The paper's "fast-moving proxies" are a learning rate: ``optimizer.loss_lr_mult`` (CUB: 4e2 / 4e-3,
    i.e. 1e5, with Adam eps = 1). With ``temperature=1`` this is PML's ``ProxyNCALoss``.
    """

    hyper_parameters = ("temperature", "epsilon")

    def __init__(self, num_classes: int, embedding_size: int, temperature: float = 1 / 9, epsilon: float = 0.0):
        if epsilon > 0:
            check_classes(num_classes, "proxy_nca_pp with label smoothing")
        super().__init__(num_classes, embedding_size)
        if temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}")
        if not 0 <= epsilon < 1:
            raise ConfigError(f"epsilon (label smoothing) must lie in [0, 1), got {epsilon}")
        self.temperature, self.epsilon = float(temperature), float(epsilon)
        self.proxies = nn.Parameter(torch.randn(num_classes, embedding_size) / 8)

    def compute(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # logits −(2 − 2 cos)/T = 2 cos/T − 2/T; the constant cancels in the softmax
        if self.epsilon == 0:
            return cosine_softmax_cross_entropy(x, self.proxies, labels, 2 / self.temperature)
        return smoothed_cross_entropy(self.cosine(x) * (2 / self.temperature), labels, self.epsilon)


@register("normalized_softmax")
class NormalizedSoftmaxLoss(ProxyLoss):
    """Normalised softmax (Zhai & Wu, "Classification is a strong baseline for deep metric learning",
    BMVC 2019 / arXiv 2018): ``cross_entropy(ŵ_cᵀx̂ / T, y)`` with L2-normalised class weights and
    embeddings, temperature T = 0.05 (PML's default). Weights initialised as a linear layer's
    (``kaiming_uniform_(a=√5)``). Equals PML's ``NormalizedSoftmaxLoss``.
    """

    hyper_parameters = ("temperature",)

    def __init__(self, num_classes: int, embedding_size: int, temperature: float = 0.05):
        super().__init__(num_classes, embedding_size)
        if temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.proxies = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.kaiming_uniform_(self.proxies, a=math.sqrt(5))

    def compute(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return cosine_softmax_cross_entropy(x, self.proxies, labels, 1 / self.temperature)


class MarginSoftmaxLoss(ProxyLoss):
    """``cross_entropy(s · logits, y)`` with ``logits = cos θ_c`` except the target class's,
    ``target(cos θ_y)``. Weights ``N(0, 0.01²)`` as in insightface."""

    hyper_parameters = ("margin", "scale")

    def __init__(self, num_classes: int, embedding_size: int, margin: float, scale: float):
        super().__init__(num_classes, embedding_size)
        if scale <= 0:
            raise ConfigError(f"scale must be > 0, got {scale}")
        self.margin, self.scale = float(margin), float(scale)
        self.proxies = nn.Parameter(torch.randn(num_classes, embedding_size) * 0.01)

    def target(self, cos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The target logit (before the scale) from the target class's cosine, and its derivative."""
        raise NotImplementedError

    def compute(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return cosine_softmax_cross_entropy(x, self.proxies, labels, self.scale, self.target)


@register("arcface")
class ArcFaceLoss(MarginSoftmaxLoss):
    """ArcFace (Deng, Guo, Xue & Zafeiriou, CVPR 2019): additive angular margin, target logit
    ``s · cos(θ_y + m)``, other logits ``s · cos θ_c``; m = 0.5 rad (28.6°), s = 64.

    ``cos(θ + m) = cos θ cos m − sin θ sin m`` with ``sin θ = √max(1 − cos² θ, 1e-7)`` (no ``acos``, finite
    gradients at cos = ±1); where θ + m > π it is replaced by ``cos θ − m sin m`` so the target logit keeps
    decreasing in θ (insightface, PML). Equals PML's ``ArcFaceLoss(margin=degrees(m), scale=s)``.
    """

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 0.5, scale: float = 64.0):
        super().__init__(num_classes, embedding_size, margin, scale)

    def target(self, cos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.margin
        sin_sq = 1 - cos * cos
        sin = torch.sqrt(torch.clamp(sin_sq, min=1e-7))
        shifted = cos * math.cos(m) - sin * math.sin(m)
        slope = math.cos(m) + torch.where(sin_sq > 1e-7, cos / sin, 0.0) * math.sin(m)
        inside = cos > math.cos(math.pi - m)
        return torch.where(inside, shifted, cos - m * math.sin(m)), torch.where(inside, slope, 1.0)


@register("cosface")
class CosFaceLoss(MarginSoftmaxLoss):
    """CosFace / large-margin cosine loss (Wang et al., CVPR 2018): target logit ``s · (cos θ_y − m)``,
    other logits ``s · cos θ_c``; m = 0.35, s = 64. Equals PML's ``CosFaceLoss``."""

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 0.35, scale: float = 64.0):
        super().__init__(num_classes, embedding_size, margin, scale)

    def target(self, cos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return cos - self.margin, torch.ones_like(cos)


@register("soft_triple")
class SoftTripleLoss(ProxyLoss):
    """SoftTriple (Qian, Shang, Sun, Hu, Li & Jin, ICCV 2019), K centres per class (class-major
    ``[C·K, D]``), cosine similarities ``s_ck``:

    ``S_c = Σ_k softmax_k(s_ck / γ) s_ck``, ``L = cross_entropy(λ (S − δ·onehot(y)), y) + τ R``,
    ``R = Σ_c Σ_{k<k'} √(2 + 1e-5 − 2 ŵ_ckᵀŵ_ck') / (C·K·(K − 1))`` (only when τ > 0 and K > 1; the sum over
    unordered pairs with the ordered-pair count as divisor is the official code's).

    Defaults from the official ``train.py``: λ (``la``) = 20, γ = 0.1, τ = 0.2, δ = 0.01, K = 10; centres
    ``kaiming_uniform_(a=√5)`` on the ``[D, C·K]`` matrix, as the official code. R is computed per class
    (memory C·K², not (C·K)²). Equals PML's ``SoftTripleLoss`` plus τ·R. Official centre lr: 1e-2
    with model lr 1e-4 (``loss_lr_mult=100``).
    """

    hyper_parameters = ("la", "gamma", "tau", "delta")

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        proxies_per_class: int = 10,
        la: float = 20.0,
        gamma: float = 0.1,
        tau: float = 0.2,
        delta: float = 0.01,
    ):
        super().__init__(num_classes, embedding_size, proxies_per_class)
        if gamma <= 0:
            raise ConfigError(f"gamma must be > 0, got {gamma}")
        self.la, self.gamma, self.tau, self.delta = float(la), float(gamma), float(tau), float(delta)
        w = torch.empty(embedding_size, num_classes * proxies_per_class)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        self.proxies = nn.Parameter(w.T.contiguous())

    def margin(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return s - self.delta, torch.ones_like(s)

    def regularizer(self) -> torch.Tensor:
        """R above, in float32 (float64 for a float64 module)."""
        k = self.proxies_per_class
        dtype = torch.float64 if self.proxies.dtype == torch.float64 else torch.float32
        w = F.normalize(self.proxies.to(dtype), dim=1).view(self.num_classes, k, -1)
        gram = w @ w.transpose(1, 2)  # [C, K, K]
        upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=w.device), diagonal=1)
        return torch.sqrt(2.0 + 1e-5 - 2.0 * gram[:, upper]).sum() / (self.num_classes * k * (k - 1))

    def compute(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        s = relaxed_class_similarity(self.cosine(x), self.proxies_per_class, self.gamma)
        loss = softmax_cross_entropy(s, labels, self.la, self.margin)
        if self.tau > 0 and self.proxies_per_class > 1:
            loss = loss + self.tau * self.regularizer()
        return loss


@register("cross_entropy")
class CrossEntropyLoss(ProxyLoss):
    """Cross-entropy as a metric-learning loss (Boudiaf, Rony, Ziko, Granger, Pedersoli, Piantanida &
    Ben Ayed, ECCV 2020): a linear classifier *with bias* on the **unnormalised** embeddings,
    ``logits = W x + b`` (``W = self.proxies [C, D]``, ``b = self.bias [C]``, both initialised to zero),
    dropout before it (p = 0.5, active in training mode only), trained with their label smoothing:
    target ``1 − ε`` on the true class and ``ε/(C − 1)`` on the others (ε = 0.1) — not torch's
    ``label_smoothing`` (ε/C everywhere). Computed as ``−Σ_c t_c log p_c`` (= KL(t‖p) + H(t), same
    gradients as the official KL). At initialisation the loss is exactly ``log C``.

    The rest of their recipe is the model's and optimiser's: ResNet-50 2048-d features (no
    normalisation in the head), SGD with weight decay 5e-4, random sampler, cosine retrieval.
    """

    hyper_parameters = ("epsilon", "dropout")

    def __init__(self, num_classes: int, embedding_size: int, epsilon: float = 0.1, dropout: float = 0.5):
        if epsilon > 0:
            check_classes(num_classes, "cross_entropy with label smoothing")
        super().__init__(num_classes, embedding_size)
        if not 0 <= epsilon < 1:
            raise ConfigError(f"epsilon (label smoothing) must lie in [0, 1), got {epsilon}")
        if not 0 <= dropout < 1:
            raise ConfigError(f"dropout must lie in [0, 1), got {dropout}")
        self.epsilon, self.dropout = float(epsilon), float(dropout)
        self.proxies = nn.Parameter(torch.zeros(num_classes, embedding_size))
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def compute(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = F.dropout(x, self.dropout, self.training)
        logits = mm(x, self.proxies.to(x.dtype).T).add_(self.bias.to(x.dtype))
        return smoothed_cross_entropy(logits, labels, self.epsilon)


@register("multi_proxy_anchor")
class MultiProxyAnchorLoss(ProxyLoss):
    """Multi-Proxy Anchor (Saeki, Kawahara & Aman, arXiv 2110.03997), reconstructed from the abstract:
    Proxy-Anchor (:class:`ProxyAnchorLoss`) applied to SoftTriple's relaxed class similarity
    ``S(x, c) = Σ_k softmax_k(s_ck / γ) s_ck`` over K proxies per class (``[C·K, D]``, class-major).

    K = 1 is exactly Proxy-Anchor; γ → 0 uses each class's closest proxy. α = 32, δ = 0.1 (Proxy-Anchor's);
    K = 3 and γ = 0.1 are **not** checked against the paper. Proxies initialised as Proxy-Anchor's.
    """

    hyper_parameters = ("alpha", "delta", "gamma")

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        proxies_per_class: int = 3,
        alpha: float = 32.0,
        delta: float = 0.1,
        gamma: float = 0.1,
    ):
        super().__init__(num_classes, embedding_size, proxies_per_class)
        if gamma <= 0:
            raise ConfigError(f"gamma must be > 0, got {gamma}")
        self.alpha, self.delta, self.gamma = float(alpha), float(delta), float(gamma)
        self.proxies = nn.Parameter(fan_out_normal(num_classes * proxies_per_class, embedding_size))

    def compute(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        s = relaxed_class_similarity(self.cosine(x), self.proxies_per_class, self.gamma)
        return proxy_anchor_terms(s, labels, self.alpha, self.delta)
