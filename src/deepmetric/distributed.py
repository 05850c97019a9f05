"""Collectives for data-parallel training (``torch.distributed``); every function is a no-op in one process.

The trainer runs under ``torchrun`` with :class:`~torch.nn.parallel.DistributedDataParallel` (DDP): each of
the W ranks embeds its own P×m batch, then **every rank computes the loss on the global batch** (the W
local batches concatenated in rank order), so miners, pair and ranking losses, cross-batch memories and
per-sample state see exactly what one process would see on the concatenated batch.

Gradients (:func:`all_gather_with_grad`): in rank r's copy of the global batch only its own rows are live
(the others are constants), so autograd gives rank r the exact ``∂L/∂x_r`` for its rows, and the backbone
gradient it produces is rank r's share of ``∂L/∂θ``. DDP then *averages* the W shares, so the gather's
backward multiplies the local gradient by W: the average is the sum, ``∂L/∂θ`` exactly. Parameters of the
loss (proxies, learnable margins) see every row on every rank and get the full ``∂L/∂P`` on each; the loss
is not scaled, so their average over ranks (:func:`average_gradients`) is exact and keeps them identical.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from deepmetric.data.base import MetricDataset, Subset
from deepmetric.errors import DataError
from deepmetric.inference import embed


def is_enabled() -> bool:
    """Whether a process group is initialised (with more than one rank or not)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_enabled() else 0


def world_size() -> int:
    return dist.get_world_size() if is_enabled() else 1


def is_main() -> bool:
    """Rank 0 (the only rank of a single process): the one that writes files and prints."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    """Whether the environment describes a multi-process launch (``torchrun`` sets ``WORLD_SIZE > 1``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init(device_type: str) -> None:
    """Join the process group described by the environment (``torchrun``: ``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``), with ``nccl`` on CUDA and ``gloo`` on CPU; nothing if already joined."""
    if not is_enabled():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")


def shutdown() -> None:
    """Leave the process group (if any)."""
    if is_enabled():
        dist.destroy_process_group()


def barrier() -> None:
    if is_enabled():
        dist.barrier()


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rows = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        start = rank() * ctx.rows
        return grad[start : start + ctx.rows] * world_size()


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``cat`` over ranks (rank order) of ``x`` (same shape on every rank), with this rank's rows live.

    The backward returns W × the gradient of this rank's rows, so that after DDP averages parameter
    gradients over the W ranks they equal one process's gradients on the concatenated batch (module
    docstring). ``x`` itself in one process.
    """
    return _GatherWithGrad.apply(x) if world_size() > 1 else x


@torch.no_grad()
def all_gather(x: torch.Tensor) -> torch.Tensor:
    """``cat`` over ranks (rank order) of ``x`` (same shape on every rank), detached; ``x`` in one process."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """``cat`` over ranks of ``x [n_r, ...]`` whose row count may differ by rank (padded to the largest
    for the collective, then trimmed); tensors stay on their device."""
    if world_size() == 1:
        return x
    counts = all_gather(torch.tensor([x.shape[0]], device=x.device))
    padded = x.new_zeros((int(counts.max()), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = all_gather(padded[None])
    return torch.cat([part[:n] for part, n in zip(parts, counts.tolist())])


def shard(n: int) -> np.ndarray:
    """This rank's contiguous share of ``range(n)`` (sizes differ by at most one, rank 0 first)."""
    return np.array_split(np.arange(n), world_size())[rank()]


def embed_sharded(model: nn.Module, dataset: MetricDataset, batch_size: int, device: torch.device,
                  amp: bool | torch.dtype = False) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`deepmetric.inference.embed` of ``dataset`` with each rank embedding its contiguous shard
    (:func:`shard`); every rank gets all embeddings (float32 CPU, data-set order) and labels."""
    if world_size() == 1:
        return embed(model, dataset, batch_size, device, amp=amp)
    if len(dataset) < world_size():
        raise DataError(f"cannot shard {len(dataset)} items over {world_size()} ranks; evaluate on more items")
    local = embed(model, Subset(dataset, shard(len(dataset))), batch_size, device, amp=amp)[0]
    gathered = all_gather_rows(local.to(device)).float().cpu()
    return gathered, torch.as_tensor(dataset.labels, dtype=torch.long)


def average_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Average the gradients of ``parameters`` over ranks in one collective (parameters outside the
    DDP-wrapped model: loss proxies, learnable margins, an augmenter's generator)."""
    if world_size() == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


@torch.no_grad()
def broadcast_state(module: nn.Module, src: int = 0, buffers_only: bool = False) -> None:
    """Copy rank ``src``'s parameters and buffers (or its buffers alone) of ``module`` to every rank."""
    if world_size() == 1:
        return
    for tensor in [*([] if buffers_only else module.parameters()), *module.buffers()]:
        dist.broadcast(tensor.data, src)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (a small picklable value, e.g. a metrics dict) on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (small and picklable, e.g. RNG states), in rank order."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
