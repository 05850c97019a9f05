"""The training objective: a weighted set of terms (losses and regularisers), each logged separately.

``objective: [{name: multi_similarity}, {name: sec, weight: 0.5}]`` in a config builds
``L = Σ_t w_t · L_t``. Every term receives what it needs from one :class:`~deepmetric.step.StepInputs` per step:

* a **loss** (registry ``deepmetric.losses``) is called with the loss contract
  ``loss(embeddings, labels, indices)``; a pair-based or ranking loss also gets the miner's ``indices``
  and, with a cross-batch memory, ``+ memory.weight · loss(embeddings, labels, ref_embeddings=…,
  ref_labels=…)``; a loss whose ``forward`` has a ``sample_ids`` parameter gets the batch's data-set
  indices (per-sample state, e.g. stochastic AUPRC). Proxy/classifier losses (``uses_references =
  False``) get neither mined indices nor the memory.
* with a **pair rule** (``step.pairs``: synthetic rows of an augmenter that must not be anchors, or the
  fixed representatives of the sampler; :mod:`deepmetric.pairing`), a pair-based loss is called as
  ``loss(embeddings[anchors], labels[anchors], indices, ref_embeddings=embeddings[references],
  ref_labels=labels[references])`` with the admissible pairs as ``indices``; with **synthetic classes**
  (``step.classes``: Proxy Synthesis, generated novel classes) a proxy loss gets the mixed proxies of the new
  classes (:func:`deepmetric.augment.proxy_loss_with_classes`).
* a **regulariser** (registry ``deepmetric.regularizers``) is called as ``regularizer(step)``.
* with an augmenter's ``aux_loss`` (DAS), every loss is evaluated twice, on the real rows alone (their own
  mined indices; :meth:`~deepmetric.step.StepInputs.real_rows`) and on real ∪ synthetic rows: ``w_t·(L_t(real) +
  aux_weight·L_t(all))``, the first logged as the term ``<name>/real``.

A term made of several parts (``hybrid``, ``ensemble``) leaves its last step's parts in a ``last_parts``
dict of detached tensors; they are reported (not summed) as ``<term>/<part>``.

Constructor parameters ``num_classes``, ``embedding_size``, ``num_samples``, ``model`` and ``lifetime``
(``sampler.lifetime``) are filled in from the run when a term's constructor has them. In a deep ensemble
(``model.members: k > 1``) every loss term is built k times, with ``embedding_size / k`` and no ``model``,
and applied to the members' embeddings by :class:`~deepmetric.losses.members.PerMemberLoss`; regularisers
see the whole ensemble.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from deepmetric import losses, regularizers
from deepmetric.augment import proxy_loss_with_classes
from deepmetric.errors import ConfigError, UnknownNameError, suggest
from deepmetric.losses.members import PerMemberLoss
from deepmetric.registry import Registry
from deepmetric.step import StepInputs


def term_registry(name: str) -> Registry:
    """The registry holding ``name``: losses first, then regularisers; an error listing both otherwise."""
    for registry in (losses.LOSSES, regularizers.REGULARIZERS):
        if name in registry:
            return registry
    names = losses.available() + regularizers.available()
    raise UnknownNameError(
        f"unknown loss or regulariser {name!r}.{suggest(name, names)} Losses: {', '.join(losses.available())}; "
        f"regularisers: {', '.join(regularizers.available())}"
    )


def _accepts(fn: Any, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def uses_references(loss: nn.Module) -> bool:
    """Whether a loss takes mined indices and memory references (pair-based and ranking losses do)."""
    return bool(getattr(loss, "uses_references", True))


class Objective(nn.Module):
    """``forward(step) -> (total, {term: value})`` with ``total = Σ_t w_t · value_t``.

    ``terms`` maps names to modules; ``weights`` maps names to floats. ``memory_weight`` is the weight of
    the loss against the cross-batch memory (XBM).
    """

    def __init__(self, terms: dict[str, nn.Module], weights: dict[str, float], memory_weight: float = 1.0):
        super().__init__()
        if not terms:
            raise ConfigError("the objective needs at least one term")
        if not any(not isinstance(t, regularizers.Regularizer) for t in terms.values()):
            raise ConfigError(f"the objective {sorted(terms)} has only regularisers; add a loss")
        self.terms = nn.ModuleDict(terms)
        self.weights = dict(weights)
        self.memory_weight = memory_weight
        self.sample_id_terms = {n for n, t in self.losses().items() if _accepts(t.forward, "sample_ids")}

    def losses(self) -> dict[str, nn.Module]:
        """The loss terms (not the regularisers)."""
        return {n: t for n, t in self.terms.items() if not isinstance(t, regularizers.Regularizer)}

    def _loss(self, name: str, loss: nn.Module, step: StepInputs) -> torch.Tensor:
        extra = {"sample_ids": step.sample_ids} if name in self.sample_id_terms else {}
        if not uses_references(loss):
            if step.classes is not None:
                return proxy_loss_with_classes(loss, step.embeddings, step.labels, step.classes)
            return loss(step.embeddings, step.labels, **extra)
        x, y, refs = step.embeddings, step.labels, {}
        if step.pairs is not None:
            anchors, references = step.pairs.rows(y.shape[0], y.device)
            x, y = x[anchors], y[anchors]
            refs = {"ref_embeddings": step.embeddings[references], "ref_labels": step.labels[references]}
        value = loss(x, y, step.indices, **refs, **extra)
        if step.memory is not None:
            mem_x, mem_y = step.memory
            value = value + self.memory_weight * loss(x, y, ref_embeddings=mem_x, ref_labels=mem_y)
        return value

    def forward(self, step: StepInputs, real: StepInputs | None = None, aux_weight: float = 1.0
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(total, values)``: ``values`` holds every term and, after them, the terms' ``last_parts``
        as ``<term>/<part>`` (reported only). With ``real`` (the real rows alone: an augmenter's
        ``aux_loss``), each loss ``t`` also gets the term ``<t>/real`` = ``L_t(real)`` of weight ``w_t``,
        and ``L_t(step)`` the weight ``aux_weight·w_t``."""
        values, weights = {}, dict(self.weights)
        for name, term in self.terms.items():
            if isinstance(term, regularizers.Regularizer):
                values[name] = term(step)
                continue
            if real is not None:
                values[f"{name}/real"], weights[f"{name}/real"] = self._loss(name, term, real), weights[name]
                weights[name] *= aux_weight
            values[name] = self._loss(name, term, step)
        total = sum(weights[n] * v for n, v in values.items())
        parts = {f"{n}/{p}": v for n, t in self.terms.items() for p, v in getattr(t, "last_parts", {}).items()}
        return total, {**values, **parts}

    def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
        for term in self.terms.values():
            if isinstance(term, regularizers.Regularizer):
                term.on_epoch_end(model, epoch)

    def extra_repr(self) -> str:
        return " + ".join(f"{w:g}·{n}" for n, w in self.weights.items())


def build_objective(config: Any, *, num_classes: int, num_samples: int, model: nn.Module) -> Objective:
    """The :class:`Objective` of a :class:`~deepmetric.training.config.RunConfig` (its ``objective`` list,
    or its single ``loss``), checked against the rest of the run (miner, memory, augmenter)."""
    k = config.model.members
    filled = {"num_classes": num_classes, "embedding_size": config.model.embedding_size,
              "num_samples": num_samples, "model": model, "lifetime": config.sampler.kwargs().get("lifetime")}
    member = dict(filled, embedding_size=config.model.embedding_size // k, model=None)  # one single-head network
    terms, weights = {}, {}
    for term in config.terms():
        registry = term_registry(term.name)
        if k > 1 and registry is losses.LOSSES:  # a deep ensemble: one copy of each loss per member
            copies = [registry.build_in_context(term.name, member, **term.kwargs()) for _ in range(k)]
            terms[term.name] = PerMemberLoss(copies, list(model.head.embedding_sizes), model.head.block_scale)
        else:
            terms[term.name] = registry.build_in_context(term.name, filled, **term.kwargs())
        weights[term.name] = term.weight
    objective = Objective(terms, weights, memory_weight=config.memory.weight)
    by_refs = [n for n, t in objective.losses().items() if uses_references(t)]
    for what, used in (("miner.name", config.miner.name), ("memory.size", config.memory.size)):
        if used and not by_refs:
            raise ConfigError(f"{what} is set but no loss of the objective uses mined pairs or a memory "
                              f"(proxy/classifier losses compare with proxies); unset {what}")
    if config.augment.name is not None and objective.sample_id_terms:
        raise ConfigError(f"{sorted(objective.sample_id_terms)} keep per-sample state and cannot take the "
                          "synthetic rows of an augmenter; set augment.name=null")
    if config.sampler.name == "fixed_representatives" and objective.sample_id_terms:
        raise ConfigError(f"{sorted(objective.sample_id_terms)} keep per-sample state and need every row as an anchor; "
                          f"sampler.name={config.sampler.name} compares samples with representatives only")
    return objective
