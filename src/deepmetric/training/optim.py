"""Optimiser with separate parameter groups (backbone, head, loss) and per-iteration LR schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from deepmetric.training.config import OptimizerConfig, ScheduleConfig


def param_groups(model: nn.Module, loss: nn.Module, cfg: OptimizerConfig) -> list[dict]:
    """Backbone, head and loss parameters (proxies, learnable margins) each get their own group and LR."""
    groups = []
    for name, module, mult in (
        ("backbone", model.backbone, cfg.backbone_lr_mult),
        ("head", model.head, cfg.head_lr_mult),
        ("loss", loss, cfg.loss_lr_mult),
    ):
        params = [p for p in module.parameters() if p.requires_grad]
        if params and mult > 0:
            groups.append({"name": name, "params": params, "lr": cfg.lr * mult})
    return groups


def build_optimizer(model: nn.Module, loss: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, loss, cfg)
    wd = cfg.weight_decay
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=wd)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=wd)
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=cfg.lr, weight_decay=wd, momentum=cfg.momentum)
    return torch.optim.SGD(groups, lr=cfg.lr, weight_decay=wd, momentum=cfg.momentum)


def lr_factor(step: int, total: int, per_epoch: int, cfg: ScheduleConfig) -> float:
    """Multiplier of every group's base LR at iteration ``step`` (0-based) of ``total``.

    Linear warm-up over ``warmup_epochs``, then: constant; cosine from 1 to ``min_lr_ratio`` at the end;
    or step decay by ``gamma`` every ``step_epochs`` epochs.
    """
    warmup = int(round(cfg.warmup_epochs * per_epoch))
    if step < warmup:
        return (step + 1) / warmup
    if cfg.name == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if cfg.name == "step":
        return cfg.gamma ** (step // (cfg.step_epochs * per_epoch))
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, total: int, per_epoch: int, cfg: ScheduleConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, per_epoch, cfg))
