"""Optimiser with separate parameter groups (backbone, head, loss) and per-iteration LR schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from deepmetric.training.config import OptimizerConfig, ScheduleConfig


def relative_lr_multipliers(loss: nn.Module) -> dict[str, float]:
    """Loss parameters whose learning rate differs from the loss group's: ``{dotted name: multiplier}``,
    collected from every submodule that defines ``lr_multipliers() -> {parameter name: multiplier}``
    (e.g. the nivMF concentrations and temperature)."""
    out = {}
    for prefix, module in loss.named_modules():
        declared = getattr(module, "lr_multipliers", None)
        if callable(declared):
            out.update({f"{prefix}.{k}" if prefix else k: float(v) for k, v in declared().items()})
    return out


def param_groups(model: nn.Module, loss: nn.Module, cfg: OptimizerConfig, augmenter: nn.Module | None = None) -> list[dict]:
    """Backbone, head and loss parameters (proxies, learnable margins) each get their own group and LR;
    a loss parameter with a declared relative multiplier gets a group ``loss:<name>`` of its own; the
    parameters of an embedding augmenter (a generator) get the group ``augmenter`` with its ``lr_mult``."""
    groups = []
    relative = relative_lr_multipliers(loss)
    loss_params = [(n, p) for n, p in loss.named_parameters() if p.requires_grad]
    sections = [
        ("backbone", [p for p in model.backbone.parameters() if p.requires_grad], cfg.backbone_lr_mult),
        ("head", [p for p in model.head.parameters() if p.requires_grad], cfg.head_lr_mult),
        ("loss", [p for n, p in loss_params if n not in relative], cfg.loss_lr_mult),
    ] + [(f"loss:{n}", [p], cfg.loss_lr_mult * relative[n]) for n, p in loss_params if n in relative]
    if augmenter is not None:
        sections.append(("augmenter", [p for p in augmenter.parameters() if p.requires_grad], augmenter.lr_mult))
    for name, params, mult in sections:
        if params and mult > 0:
            groups.append({"name": name, "params": params, "lr": cfg.lr * mult})
    return groups


def build_optimizer(model: nn.Module, loss: nn.Module, cfg: OptimizerConfig,
                    augmenter: nn.Module | None = None) -> torch.optim.Optimizer:
    groups = param_groups(model, loss, cfg, augmenter)
    wd, eps = cfg.weight_decay, cfg.eps
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=wd, eps=eps)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=wd, eps=eps)
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=cfg.lr, weight_decay=wd, momentum=cfg.momentum, eps=eps)
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
