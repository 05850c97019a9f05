"""Weight transfer (the classification baseline of Scott, Ridgeway & Mozer, NeurIPS 2018).

A network trained as a classifier on the source classes keeps everything up to its output layer (here
the backbone and embedding head of a ``cross_entropy`` training run); a new ``n``-way linear output layer
``logits = W f(x) + b`` replaces the source classifier and **all** weights are fine-tuned with the
cross-entropy on the ``n·k`` target examples, with the paper's stopping rule on the training accuracy
(:func:`~deepmetric.fewshot.adapted.fit_target`). The *baseline* is the same n-way classifier trained
from a freshly initialised network.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from deepmetric.errors import ConfigError
from deepmetric.fewshot.adapted import FitResult, fit_target, trainable
from deepmetric.fewshot.config import WeightTransferConfig


class TransferClassifier(nn.Module):
    """``output(body(x))``: an embedding network with an n-way linear layer on top."""

    def __init__(self, body: nn.Module, in_features: int, n_classes: int, init: str = "xavier"):
        super().__init__()
        self.body = body
        self.output = nn.Linear(in_features, n_classes)
        if init == "xavier":
            nn.init.xavier_uniform_(self.output.weight)
        elif init == "normal":
            nn.init.normal_(self.output.weight, 0.0, 1.0)
        elif init != "default":
            raise ConfigError(f"head_init must be 'xavier', 'normal' or 'default', got {init!r}")
        nn.init.zeros_(self.output.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.body(x))


def classifier_accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(inputs).argmax(1) == labels).double().mean())


def weight_transfer(body: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, n_classes: int,
                    cfg: WeightTransferConfig, seed: int = 0, fresh: bool = False) -> FitResult:
    """Fine-tune a copy of ``body`` (an embedding model, ``[B, D]`` outputs) with a new ``n_classes``-way
    output layer on the support set ``(inputs, labels)`` (local labels); ``.model`` is the classifier (in
    eval mode). A source ``body`` keeps its BatchNorm statistics (eval mode, see :mod:`~deepmetric.fewshot.
    adapted`); a ``fresh`` one (the baseline) has none to keep and trains in train mode."""
    body = copy.deepcopy(body).eval()
    with torch.no_grad():
        width = body(inputs[:1]).shape[1]
    torch.manual_seed(seed)
    model = TransferClassifier(body, width, n_classes, cfg.head_init).to(inputs.device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    params = trainable(body, cfg.params) + list(model.output.parameters())
    for p in params:
        p.requires_grad_(True)
    def loss_fn(x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, epoch: int) -> torch.Tensor:
        model.train(fresh)
        return F.cross_entropy(model(x), y)

    def accuracy() -> float:
        return classifier_accuracy(model.eval(), inputs, labels)

    result = fit_target(model, params, inputs, labels, loss_fn, cfg, accuracy, seed)
    result.model.eval()
    return result
