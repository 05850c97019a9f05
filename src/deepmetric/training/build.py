"""Turning a validated :class:`RunConfig` into data splits, a model and a miner (the objective: ``objective.py``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from deepmetric import data, miners, models
from deepmetric.data.base import MetricDataset, Subset, class_folds, select_classes, split_classes
from deepmetric.data.transforms import normalization_for
from deepmetric.distributed import launched_by_torchrun, local_rank
from deepmetric.errors import ConfigError
from deepmetric.models import EmbeddingModel
from deepmetric.models.members import MemberHeads, ParallelBackbones
from deepmetric.training.config import RunConfig, check_components
from deepmetric.hooks import Hook


@dataclass
class Splits:
    """``train`` is what the sampler draws from; ``val`` (optional) holds training classes held out for
    checkpoint selection; evaluation is leave-one-out on ``test`` or ``query`` vs ``gallery``."""

    train: MetricDataset
    val: MetricDataset | None
    test: MetricDataset | None
    query: MetricDataset | None = None
    gallery: MetricDataset | None = None


def _data(cfg: RunConfig, split: str, augment: bool | None = None) -> MetricDataset:
    kwargs = dict(cfg.data.kwargs)
    if "normalization" in data.DATASETS.parameters(cfg.data.name):  # match the backbone's input statistics
        kwargs.setdefault("normalization", normalization_for(cfg.model.backbone))
    if augment is not None and "augment" in data.DATASETS.parameters(cfg.data.name):
        kwargs["augment"] = augment
    return data.build(cfg.data.name, root=cfg.data.root, split=split, **kwargs)


def build_splits(cfg: RunConfig) -> Splits:
    train = _data(cfg, cfg.data.train_split)
    val = None
    if cfg.data.val_classes or cfg.data.val_folds:
        if cfg.data.val_folds:
            kept, held = class_folds(train.labels, cfg.data.val_folds, cfg.data.val_fold)
        else:
            kept, held = split_classes(train.labels, cfg.data.val_classes, seed=cfg.seed)
        val = select_classes(_data(cfg, cfg.data.train_split, augment=False), held)
        train = select_classes(train, kept)
    if cfg.data.query_split or cfg.data.gallery_split:
        return Splits(train, val, None, _data(cfg, cfg.data.query_split), _data(cfg, cfg.data.gallery_split))
    return Splits(train, val, _data(cfg, cfg.data.test_split))


def unaugmented(cfg: RunConfig, train: MetricDataset) -> MetricDataset:
    """The training split ``train`` of :func:`build_splits` (same items, same order) without random
    augmentation where the data set has an ``augment`` switch: for embedding training samples (CCP's pool)."""
    clean = _data(cfg, cfg.data.train_split, augment=False)
    return Subset(clean, train.indices) if isinstance(train, Subset) else clean


def build_model(cfg: RunConfig) -> EmbeddingModel:
    """Backbone -> head; with ``model.members: k > 1`` a deep ensemble of k such networks, built one after the
    other from the same random stream (member 0 is the network a single-model run of this seed builds)."""
    m = cfg.model
    size = m.embedding_size // m.members
    backbones, heads = [], []
    for _ in range(m.members):
        backbones.append(models.build(m.backbone, pretrained=m.pretrained, pretrained_path=m.pretrained_path,
                                      **m.backbone_kwargs))
        heads.append(models.HEADS.build(m.head, in_features=backbones[-1].num_features, embedding_size=size,
                                        batch_norm=m.batch_norm, normalize=m.normalize, **m.head_kwargs))
    if m.members == 1:
        return EmbeddingModel(backbones[0], heads[0], freeze_bn=m.freeze_bn)
    parallel = ParallelBackbones(backbones)
    return EmbeddingModel(parallel, MemberHeads(heads, parallel.sizes), freeze_bn=m.freeze_bn)


def build_miner(cfg: RunConfig) -> nn.Module | None:
    return miners.build(cfg.miner.name, **cfg.miner.kwargs()) if cfg.miner.name else None


def build_hooks(cfg: RunConfig) -> list[Hook]:
    """The trainer hooks the configuration asks for: CCP-DML proxy re-placement (``proxies.ccp``)."""
    hooks: list[Hook] = []
    if cfg.proxies.ccp:
        from deepmetric.proxies import CCPProxyReplacement  # lazy: deepmetric.proxies imports the training package

        hooks.append(CCPProxyReplacement(**cfg.proxies.model_dump(exclude={"ccp"}), seed=cfg.seed))
    return hooks


def resolve_device(name: str, distributed: bool = False) -> torch.device:
    """The device ``name`` (``auto``: CUDA if available); in a distributed run on CUDA, this process's GPU
    ``cuda:LOCAL_RANK`` (made current)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if not distributed or device.type != "cuda":
        return device
    if device.index is not None:
        raise ConfigError(f"device {name!r} names one GPU, but a torchrun launch gives each process its own: "
                          "set device: cuda (or auto); process LOCAL_RANK=i uses cuda:i")
    device = torch.device("cuda", local_rank())
    torch.cuda.set_device(device)
    return device


def resolve_distributed(mode: str) -> bool:
    """Whether ``train.distributed`` (``auto``/``on``/``off``) trains data-parallel in this process."""
    launched = launched_by_torchrun()
    if mode == "off" and launched:
        raise ConfigError("train.distributed=off in a torchrun launch of several processes: each would train alone "
                          "and write the same run folder; launch one process or set train.distributed=auto")
    if mode == "on" and not launched:
        raise ConfigError("train.distributed=on needs a torchrun launch (WORLD_SIZE > 1 is not set): run "
                          "`torchrun --nproc_per_node N --no-python deepmetric train ...`, or set train.distributed=auto")
    return launched and mode != "off"


def resolve_amp(amp: bool | str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.amp`` on ``device`` (None = full precision): ``bf16`` on any device,
    ``fp16`` on CUDA, ``true`` = fp16 on CUDA and off elsewhere (the original meaning), ``false`` = off."""
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError(f"train.amp=fp16 needs a CUDA device (it trains with a gradient scaler), the run uses "
                          f"{device}; use train.amp=bf16 (CPU autocast) or train.amp=false")
    return torch.float16 if amp == "fp16" or (amp is True and device.type == "cuda") else None


__all__ = ["Splits", "build_splits", "build_model", "build_miner", "build_hooks", "resolve_device", "resolve_distributed",
           "resolve_amp", "check_components"]
