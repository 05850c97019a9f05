"""Trainer hooks: methods such as proxy re-placement or memory banks attach here, not inside the loop.

Subclass :class:`Hook` and override what you need; hooks run in list order. A hook with state
implements ``state_dict`` / ``load_state_dict``: it is saved in every checkpoint and restored on resume.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deepmetric.training.trainer import Trainer


class Hook:
    def on_train_start(self, trainer: Trainer) -> None: ...

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None: ...

    def on_batch_end(self, trainer: Trainer, epoch: int, iteration: int, loss: float) -> None: ...

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, Any]) -> None: ...

    def on_train_end(self, trainer: Trainer) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
