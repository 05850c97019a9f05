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

import torch
import torch.nn.functional as F
from torch import nn

from deepmetric.distances import as_compute_dtype
from deepmetric.errors import ConfigError, InputError, LabelError
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


def proxy_anchor_terms(sim: torch.Tensor, labels: torch.Tensor, alpha: float, delta: float) -> torch.Tensor:
    """Proxy-Anchor on a sample-to-class similarity matrix ``sim [B, C]`` (see :class:`ProxyAnchorLoss`)."""
    pos = F.one_hot(labels, sim.shape[1]).bool()
    pos_term = masked_logsumexp(-alpha * (sim - delta), pos, dim=0, add_one=True)
    neg_term = masked_logsumexp(alpha * (sim + delta), ~pos, dim=0, add_one=True)
    n_with_pos = pos.any(0).sum().clamp(min=1)
    return pos_term.sum() / n_with_pos + neg_term.sum() / sim.shape[1]


def cosine_to_proxies(x: torch.Tensor, proxies: torch.Tensor) -> torch.Tensor:
    """``x̂ ŵᵀ`` in ``x``'s dtype (float32 or float64): cosine similarity to each proxy, ``[B, P]``."""
    return F.normalize(x, dim=1) @ F.normalize(proxies.to(x.dtype), dim=1).T


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
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
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


def relaxed_class_similarity(sim: torch.Tensor, k: int, gamma: float) -> torch.Tensor:
    """SoftTriple's relaxed similarity to each class from ``sim [B, C·K]`` (class-major):
    ``S_c = Σ_k softmax_k(s_ck / γ) · s_ck``, ``[B, C]``. γ → 0 gives ``max_k s_ck``; K = 1 gives ``s``."""
    if k == 1:
        return sim
    s = sim.view(sim.shape[0], -1, k)
    return (torch.softmax(s / gamma, dim=2) * s).sum(2)


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
        logits = -(2 - 2 * self.cosine(x)) / self.temperature
        return smoothed_cross_entropy(logits, labels, self.epsilon)


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
        return F.cross_entropy(self.cosine(x) / self.temperature, labels)


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

    def target(self, cos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def compute(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = self.cosine(x)
        idx = labels[:, None]
        logits = cos.scatter(1, idx, self.target(cos.gather(1, idx)))
        return F.cross_entropy(self.scale * logits, labels)


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

    def target(self, cos: torch.Tensor) -> torch.Tensor:
        m = self.margin
        sin = torch.sqrt(torch.clamp(1 - cos * cos, min=1e-7))
        shifted = cos * math.cos(m) - sin * math.sin(m)
        return torch.where(cos > math.cos(math.pi - m), shifted, cos - m * math.sin(m))


@register("cosface")
class CosFaceLoss(MarginSoftmaxLoss):
    """CosFace / large-margin cosine loss (Wang et al., CVPR 2018): target logit ``s · (cos θ_y − m)``,
    other logits ``s · cos θ_c``; m = 0.35, s = 64. Equals PML's ``CosFaceLoss``."""

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 0.35, scale: float = 64.0):
        super().__init__(num_classes, embedding_size, margin, scale)

    def target(self, cos: torch.Tensor) -> torch.Tensor:
        return cos - self.margin


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
        margin = F.one_hot(labels, self.num_classes).to(s.dtype) * self.delta
        loss = F.cross_entropy(self.la * (s - margin), labels)
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
        logits = F.linear(x, self.proxies.to(x.dtype), self.bias.to(x.dtype))
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
