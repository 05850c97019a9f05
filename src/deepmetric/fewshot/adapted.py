"""Training on the k-shot target data: adapted embeddings (Scott, Ridgeway & Mozer, NeurIPS 2018) and the
few-shot adaptation of the ooDML study (Milbich et al., NeurIPS 2021).

:func:`fit_target` is the loop both use: Adam on the chosen parameters, one epoch = one shuffled pass
over the support set in batches, and optionally the **stopping rule of Scott et al.** (their
``run_model.py``): the training accuracy is measured after every epoch and the weights of the epoch with
the best one are kept (strictly better; ties keep the earlier epoch); every ``patience`` epochs training
stops when the best accuracy gained less than ``min_gain · a`` since the previous check, where ``a`` is
the best accuracy at that check (0 at the start). Without an accuracy it runs ``max_epochs`` epochs and
keeps the last weights (the ooDML protocol).

:func:`adapt_embedding` continues training an embedding model on the support set with any objective
(the source run's DML loss, the prototypical loss, ...). The model's normalisation layers stay in eval
mode: a k-shot batch is too small to re-estimate BatchNorm statistics (ooDML keeps the whole network in
eval mode). The source model is never modified (the adapted one is a deep copy).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from deepmetric.errors import ConfigError
from deepmetric.fewshot.config import TargetFit
from deepmetric.step import StepInputs
from deepmetric.training.objective import Objective


class StoppingRule:
    """Scott et al. (2018): keep the best training accuracy; every ``patience`` epochs stop if it gained
    less than ``min_gain`` (relative) since the previous check."""

    def __init__(self, patience: int, min_gain: float):
        self.patience, self.min_gain = patience, min_gain
        self.best, self.best_epoch, self.reference = -math.inf, 0, 0.0

    def update(self, epoch: int, accuracy: float) -> tuple[bool, bool]:
        """Record the accuracy after ``epoch`` (1-based); returns ``(new best, stop now)``."""
        improved = accuracy > self.best
        if improved:
            self.best, self.best_epoch = accuracy, epoch
        stop = False
        if epoch % self.patience == 0:
            stop = self.best - self.reference < self.min_gain * self.reference
            self.reference = self.best
        return improved, stop


@dataclass
class FitResult:
    """The trained model (best or last epoch), the epoch its weights come from (0 = untouched), the epochs
    run and the training accuracy after each."""

    model: nn.Module
    epoch: int
    epochs_run: int
    train_accuracy: list[float] = field(default_factory=list)


def fit_target(
    model: nn.Module,
    params: Iterable[nn.Parameter],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor],
    cfg: TargetFit,
    accuracy: Callable[[], float] | None = None,
    seed: int = 0,
) -> FitResult:
    """Train ``params`` of ``model`` (in place) on ``(inputs, labels)``; ``loss_fn(x, y, ids, epoch)``.

    With ``accuracy`` (a function of the current model) the stopping rule applies and the best epoch's
    weights are restored; without it, ``cfg.max_epochs`` epochs run and the last weights stay.
    """
    params = [p for p in params if p.requires_grad]
    if not params and cfg.max_epochs:
        raise ConfigError("nothing to train: the chosen parameters are all frozen")
    optimizer = torch.optim.Adam(params, lr=cfg.lr) if params else None
    generator = torch.Generator().manual_seed(seed)
    rule = StoppingRule(cfg.patience, cfg.min_gain)
    history: list[float] = []
    best_state, epoch = None, 0
    for epoch in range(1, cfg.max_epochs + 1):
        order = torch.randperm(len(labels), generator=generator).to(labels.device)
        for ids in order.split(cfg.batch_size):
            loss = loss_fn(inputs[ids], labels[ids], ids, epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if accuracy is None:
            continue
        history.append(accuracy())
        improved, stop = rule.update(epoch, history[-1])
        if improved:
            best_state = copy.deepcopy(model.state_dict())
        if stop:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    chosen = rule.best_epoch if accuracy is not None else epoch
    return FitResult(model, chosen, epoch, history)


def trainable(model: nn.Module, which: str) -> list[nn.Parameter]:
    """``all`` parameters, or ``head``: the embedding head's last linear layer (``model.head.linear``)."""
    if which == "all":
        return list(model.parameters())
    if which == "head":
        linear = getattr(getattr(model, "head", None), "linear", None)
        if not isinstance(linear, nn.Linear):
            raise ConfigError("params='head' needs an embedding model with head.linear (deepmetric's EmbeddingModel)")
        return list(linear.parameters())
    raise ConfigError(f"params must be 'all' or 'head', got {which!r}")


def adapt_embedding(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    objective: Objective,
    cfg: TargetFit,
    accuracy: Callable[[torch.Tensor, torch.Tensor], float] | None = None,
    miner: nn.Module | None = None,
    seed: int = 0,
) -> FitResult:
    """A copy of the embedding ``model`` trained on the support set ``(inputs, labels)`` (local labels
    ``0..n-1``) with ``objective``; ``accuracy(embeddings, labels)`` of the support set switches on the
    stopping rule (e.g. :func:`~deepmetric.fewshot.prototypes.loo_knn_accuracy`)."""
    model = copy.deepcopy(model).eval()  # eval: BatchNorm keeps the source statistics
    objective = copy.deepcopy(objective).train()
    for p in model.parameters():
        p.requires_grad_(False)
    params = trainable(model, cfg.params)
    for p in params:
        p.requires_grad_(True)
    params += [p for p in objective.parameters() if p.requires_grad]

    # head only: the frozen backbone (eval mode) gives the same features every epoch, so compute them once
    features = None
    if cfg.params == "head":
        with torch.no_grad():
            features = model.backbone(inputs)

    def loss_fn(x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, epoch: int) -> torch.Tensor:
        raw, emb = model(x, return_raw=True) if features is None else model.head(features[ids], return_raw=True)
        step = StepInputs(
            embeddings=emb, labels=y, raw=raw, inputs=x, sample_ids=ids,
            is_synthetic=torch.zeros(len(y), dtype=torch.bool, device=emb.device), model=model,
            epoch=epoch, epochs=cfg.max_epochs, indices=miner(emb, y) if miner is not None else None,
        )
        return objective(step)[0]

    def support_accuracy() -> float:
        with torch.no_grad():
            return accuracy(model(inputs) if features is None else model.head(features), labels)

    return fit_target(model, params, inputs, labels, loss_fn, cfg, support_accuracy if accuracy else None, seed)
