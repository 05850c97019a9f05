"""Trainer hooks: methods such as proxy re-placement or memory banks attach here, not inside the loop.

Subclass :class:`Hook` and override what you need; hooks run in list order. A hook with state
implements ``state_dict`` / ``load_state_dict``: it is saved in every checkpoint and restored on resume.

Hooks see the trainer through :class:`TrainerView`, the part of
:class:`deepmetric.training.Trainer` they may use, so that the library's methods (CCP, IAA,
augmenters) depend on this protocol and never on the training package (which depends on them).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from deepmetric.data.base import MetricDataset


class TrainerView(Protocol):
    """What a hook may read from the trainer: the run's validated ``config`` (a ``RunConfig``), its
    ``model``, ``objective`` (the loss terms) and ``optimizer``, the data ``splits`` (``.train``,
    ``.val``, ``.test``), ``label_map`` (data-set label -> 0..C-1 training class), the ``device``,
    ``amp_dtype`` (autocast dtype of ``train.amp``; None = full precision), the last finished ``epoch`` and
    ``select_on`` (which split picks the checkpoint)."""

    config: Any
    model: nn.Module
    objective: nn.Module
    optimizer: torch.optim.Optimizer
    splits: Any
    label_map: torch.Tensor
    device: torch.device
    amp_dtype: torch.dtype | None
    epoch: int
    select_on: str

    def unaugmented_train(self) -> MetricDataset:
        """The training split (same items, same order) without random input augmentation."""
        ...


class Hook:
    def on_train_start(self, trainer: TrainerView) -> None: ...

    def on_epoch_start(self, trainer: TrainerView, epoch: int) -> None: ...

    def on_batch_end(self, trainer: TrainerView, epoch: int, iteration: int, loss: float) -> None: ...

    def on_epoch_end(self, trainer: TrainerView, epoch: int, metrics: dict[str, Any]) -> None: ...

    def on_train_end(self, trainer: TrainerView) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
