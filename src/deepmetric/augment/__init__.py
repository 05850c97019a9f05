"""Embedding-space augmentation: extra (synthetic) embeddings and labels made inside the training step.

Contract: an augmenter is an :class:`Augmenter` (``nn.Module``) called by the trainer between the embedding
head and the miner/loss as ``augmenter(embeddings[B, D], labels[B], raw=None) -> Augmented``, where ``raw``
is the head output before L2-normalisation (IAA perturbs it) and :class:`Augmented` holds

* ``embeddings [N, D]``, ``labels [N]``, ``is_synthetic [N]`` — the real rows first and unchanged
  (``embeddings[:B]`` equals the input);
* ``pairs``: a :class:`~deepmetric.pairing.PairRule` when synthetic rows must not be anchors or positives
  (IAA, Embedding Expansion); ``None`` lets every row pair with every row (DAS);
* ``classes``: a :class:`ClassMix` when synthetic rows carry **new classes** ``C, C+1, ...`` made by mixing
  two real classes (Proxy Synthesis, generated novel classes); a proxy loss of the objective then sees
  those classes with mixed proxies (:func:`proxy_loss_with_classes`), without any change to the loss.

State kept across steps (memory banks, per-class statistics) lives in buffers, trainable parts (generators)
in parameters: the trainer saves both in checkpoints, and gives parameters an optimiser group ``augmenter``
with learning rate ``optimizer.lr × lr_mult``. :meth:`Augmenter.on_train_start` / :meth:`~Augmenter.on_epoch_end`
run between epochs (IAA's estimation pass). Every augmenter has a setting that makes it the identity
(``N = B``; e.g. ``num_produce: 0``). An augmenter whose ``aux_loss`` is true (DAS's option) has the
objective evaluate every loss on the real rows alone as well: ``L_t(real) + aux_weight·L_t(real ∪ synthetic)``
(:meth:`deepmetric.training.objective.Objective.forward`).

Configure with ``augment: {name: das, ...}``; :func:`from_config` fills ``num_classes``,
``embedding_size`` and ``normalize`` (the head's L2-normalisation) from the run when the constructor takes
them. Registry keys: ``das``, ``iaa``, ``novel_classes``, ``proxy_synthesis``, ``embedding_expansion``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from deepmetric.errors import ConfigError, InputError, LabelError
from deepmetric.losses.proxy import ProxyLoss
from deepmetric.pairing import PairRule
from deepmetric.registry import Registry
from deepmetric.validation import check_embeddings, check_labels

if TYPE_CHECKING:
    from deepmetric.hooks import TrainerView

AUGMENTERS: Registry[nn.Module] = Registry("augmenter")
register = AUGMENTERS.register


@dataclass
class ClassMix:
    """Synthetic classes ``C + s`` (s = 0..S-1) as mixtures of two real classes:
    ``weight[s]`` · class ``first[s]`` + (1 − ``weight[s]``) · class ``second[s]``."""

    first: torch.Tensor
    second: torch.Tensor
    weight: torch.Tensor


class Augmented(NamedTuple):
    """What an augmenter returns (see the module docstring)."""

    embeddings: torch.Tensor
    labels: torch.Tensor
    is_synthetic: torch.Tensor
    pairs: PairRule | None = None
    classes: ClassMix | None = None


class Augmenter(nn.Module):
    """Base class: ``forward(embeddings, labels, raw=None) -> Augmented``."""

    lr_mult: float = 1.0  # learning-rate multiplier of the augmenter's parameters (generators)
    aux_loss: bool = False  # the losses also on the real rows alone, those on all rows weighted by aux_weight
    aux_weight: float = 1.0

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, raw: torch.Tensor | None = None) -> Augmented:
        raise NotImplementedError

    def on_train_start(self, trainer: TrainerView) -> None:
        """Called by the trainer before the first epoch (also on resume, after the state is restored)."""

    def on_epoch_end(self, trainer: TrainerView, epoch: int) -> None:
        """Called by the trainer after epoch ``epoch`` (1-based), before the checkpoint is written."""

    @staticmethod
    def append(embeddings: torch.Tensor, labels: torch.Tensor, extra: torch.Tensor, extra_labels: torch.Tensor,
               pairs: PairRule | None = None, classes: ClassMix | None = None) -> Augmented:
        """``[real; extra]`` with ``is_synthetic`` marking the extra rows."""
        synthetic = torch.arange(labels.shape[0] + extra_labels.shape[0], device=labels.device) >= labels.shape[0]
        return Augmented(torch.cat([embeddings, extra.to(embeddings.dtype)]), torch.cat([labels, extra_labels]),
                         synthetic, pairs, classes)

    @staticmethod
    def identity(embeddings: torch.Tensor, labels: torch.Tensor) -> Augmented:
        return Augmented(embeddings, labels, torch.zeros_like(labels, dtype=torch.bool))


def check_class_batch(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int, embedding_size: int,
                      name: str) -> None:
    """Embeddings ``[B, embedding_size]`` and labels in ``[0, num_classes)`` (the trainer's remapped labels)."""
    check_embeddings(embeddings)
    check_labels(labels, embeddings.shape[0])
    if embeddings.shape[1] != embedding_size:
        raise InputError(f"{name} was built for embedding_size={embedding_size}, got embeddings of dimension "
                          f"{embeddings.shape[1]}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise LabelError(f"{name} keeps per-class state for {num_classes} classes; labels must lie in "
                          f"[0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")


def maybe_normalize(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    return F.normalize(x, dim=-1) if normalize else x


def copies_rule(n_real: int, n: int, device: torch.device) -> PairRule:
    """Synthetic rows laid out copy-major after the real ones (row ``B·t + i`` is a copy of row ``i``): only
    real rows are anchors, and an anchor's own copies are not its positives (IAA)."""
    rows = torch.arange(n, device=device)
    return PairRule(anchors=rows[:n_real], origin=rows % n_real)


def proxy_loss_with_classes(loss: nn.Module, embeddings: torch.Tensor, labels: torch.Tensor, mix: ClassMix) -> torch.Tensor:
    """``loss(embeddings, labels)`` for a proxy loss whose labels include the synthetic classes of ``mix``.

    For this call only, the loss has ``C + S`` classes: class ``C + s`` gets the proxies
    ``w_s·p̂_{a_s,k} + (1 − w_s)·p̂_{b_s,k}`` (k = 1..K proxies per class; rows L2-normalised before mixing,
    as Proxy Synthesis's code), appended to the real proxies through ``torch.func.functional_call``, so
    gradients reach the real proxies of both classes. Losses with other per-class parameters (the bias of
    ``cross_entropy``) are refused.
    """
    if not isinstance(loss, ProxyLoss):
        raise ConfigError(f"{type(loss).__name__} has no proxies, so it cannot take the synthetic classes of "
                          "proxy_synthesis/novel_classes; use a proxy loss (e.g. normalized_softmax, proxy_anchor)")
    c, k = loss.num_classes, loss.proxies_per_class
    for name, p in loss.named_parameters():
        if name != "proxies" and p.ndim and p.shape[0] == c * k:
            raise ConfigError(f"{type(loss).__name__} has the per-class parameter {name!r} besides its proxies; "
                              "synthetic classes are defined for proxies only")
    p = F.normalize(loss.proxies, dim=1).view(c, k, -1)
    w = mix.weight.to(p.dtype)[:, None, None]
    extra = (w * p[mix.first] + (1 - w) * p[mix.second]).reshape(-1, p.shape[-1])
    loss.num_classes = c + mix.first.shape[0]
    try:
        return functional_call(loss, {"proxies": torch.cat([loss.proxies, extra.to(loss.proxies.dtype)])},
                               (embeddings, labels))
    finally:
        loss.num_classes = c


def build(name: str, **kwargs: Any) -> nn.Module:
    """Construct the augmenter registered as ``name``."""
    return AUGMENTERS.build(name, **kwargs)


def available() -> list[str]:
    """Registry keys of all augmenters."""
    return AUGMENTERS.available()


def from_config(config: Any, num_classes: int) -> Augmenter | None:
    """The augmenter of a :class:`~deepmetric.training.config.RunConfig` (``None`` when ``augment.name`` is
    null), with ``num_classes``, ``embedding_size`` and ``normalize`` filled in from the run."""
    if config.augment.name is None:
        return None
    if config.sampler.name != "m_per_class":
        raise ConfigError(f"augment.name={config.augment.name} needs m_per_class batches, but sampler.name is "
                          f"{config.sampler.name!r} (whose batches already fix which rows pair up)")
    filled = {"num_classes": num_classes, "embedding_size": config.model.embedding_size,
              "normalize": config.model.normalize}
    return AUGMENTERS.build_in_context(config.augment.name, filled, **config.augment.kwargs())


from deepmetric.augment import das, generative, iaa  # noqa: E402,F401  (registers the augmenters)
