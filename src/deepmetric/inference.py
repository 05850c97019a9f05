"""Embedding a data set with a model, batch by batch, without gradients."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from deepmetric.data import MetricDataset


@torch.no_grad()
def embed(
    model: nn.Module,
    dataset: MetricDataset,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    amp: bool | torch.dtype = False,
    raw: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(embeddings [N, D] float32 on CPU, labels [N] int64)`` in data set order; with ``raw``, the
    head output before L2-normalisation (``model(x, return_raw=True)[0]``). ``amp``: an autocast dtype (e.g.
    ``torch.bfloat16``, on any device), or True for float16 autocast on CUDA only."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    dtype = amp if isinstance(amp, torch.dtype) else torch.float16 if amp and device.type == "cuda" else None
    chunks = []
    for x, _ in loader:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            x = x.to(device, non_blocking=True)
            chunks.append((model(x, return_raw=True)[0] if raw else model(x)).float().cpu())
    model.train(was_training)
    return torch.cat(chunks), torch.as_tensor(dataset.labels, dtype=torch.long)
