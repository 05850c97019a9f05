"""Helpers shared by the transfer and ooDML protocols: source runs and support-set tensors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deepmetric.data.base import MetricDataset, Subset
from deepmetric.training.config import RunConfig, dump
from deepmetric.inference import embed
from deepmetric.training.evaluate_run import load_run_model


def train_or_reuse(cfg: RunConfig, folder: Path, overwrite: bool = False, progress: bool = False,
                   echo: Callable[[str], None] = print) -> tuple[nn.Module, dict]:
    """The model and summary of the training run ``cfg`` in ``folder``: reused when the folder holds a
    finished run of exactly this configuration (and ``overwrite`` is off), trained with the
    :class:`~deepmetric.training.trainer.Trainer` otherwise (``overwrite`` replaces another run there)."""
    import json

    from deepmetric.training.trainer import Trainer

    summary = folder / "summary.json"
    if not overwrite and summary.is_file() and (folder / "config.yaml").read_text() == dump(cfg):
        echo(f"reusing the finished run {folder}")
        return load_run_model(folder)[1].eval(), json.loads(summary.read_text())
    echo(f"training {cfg.data.name}/{cfg.method} into {folder}")
    trainer = Trainer(cfg, folder, overwrite=overwrite, progress=progress)
    result = trainer.fit()
    return trainer.model.eval(), result


def stack_inputs(dataset: MetricDataset, indices: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """The inputs of the items ``indices`` as one batch tensor (a support set: a few hundred items at most)."""
    return torch.stack([torch.as_tensor(dataset[int(i)][0]) for i in indices]).to(device)


def embed_items(model: nn.Module, dataset: MetricDataset, indices: np.ndarray, device: torch.device,
                batch_size: int = 256) -> torch.Tensor:
    """Outputs of ``model`` for the items ``indices`` of ``dataset`` (on CPU, float32)."""
    return embed(model, Subset(dataset, indices), batch_size, device)[0]
