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
        self.proxies = nn.Parameter(torch.randn(num_classes, embedding_size))
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")

    def compute(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return proxy_anchor_terms(self.cosine(x), labels, self.alpha, self.delta)
