"""Cross-batch memory (XBM; Wang, Zhang, Huang & Scott, CVPR 2020): a FIFO queue of past embeddings.

Embeddings drift slowly once training has warmed up, so the embeddings of the last M samples can serve
as extra references for any pair-based loss: ``L = ℓ(x, y) + λ·ℓ(x, y, ref_embeddings=m_x, ref_labels=m_y)``.
The queue lives in buffers, so it follows ``.to(device)`` and is saved in (and restored from) the
trainer's checkpoint with the loss module's ``state_dict``.

Example (one training step)::

    memory = CrossBatchMemory(size=8192, embedding_size=128)
    loss = criterion(x, y)
    if len(memory) > 0:
        mem_x, mem_y = memory.get()
        loss = loss + 1.0 * criterion(x, y, ref_embeddings=mem_x, ref_labels=mem_y)
    memory.enqueue(x, y)  # after the loss: the current batch is never its own reference

The official code enqueues first and drops the current batch's self-pairs (cosine ≥ 1 − 1e-5); enqueuing
after the loss gives the same pairs (the batch's own pairs are in ``ℓ(x, y)``) without that threshold.
"""

from __future__ import annotations

import torch
from torch import nn

from deepmetric.errors import ConfigError, InputError
from deepmetric.validation import check_pair


class CrossBatchMemory(nn.Module):
    """FIFO queue of the last ``size`` (embedding, label) pairs; embeddings are stored detached.

    Buffers: ``embeddings [size, D]`` (float32), ``labels [size]`` (int64), ``ptr`` (next slot) and
    ``count`` (filled slots).
    """

    def __init__(self, size: int, embedding_size: int):
        super().__init__()
        if size < 1 or embedding_size < 1:
            raise ConfigError(f"size and embedding_size must be positive, got {size} and {embedding_size}")
        self.size = size
        self.register_buffer("embeddings", torch.zeros(size, embedding_size))
        self.register_buffer("labels", torch.zeros(size, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def __len__(self) -> int:
        return int(self.count)

    @torch.no_grad()
    def enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Append a batch (detached, cast to float32), overwriting the oldest entries when full."""
        check_pair(embeddings, labels)
        if embeddings.shape[1] != self.embeddings.shape[1]:
            raise InputError(
                f"embeddings have dimension {embeddings.shape[1]}, the memory holds {self.embeddings.shape[1]}"
            )
        x = embeddings.detach()[-self.size :].to(self.embeddings)
        y = labels[-self.size :].to(self.labels)
        slots = (self.ptr + torch.arange(x.shape[0], device=self.ptr.device)) % self.size
        self.embeddings[slots] = x
        self.labels[slots] = y
        self.ptr.copy_((self.ptr + x.shape[0]) % self.size)
        self.count.clamp_(max=self.size - x.shape[0]).add_(x.shape[0])

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored embeddings ``[len(self), D]`` and labels (in slot order, not insertion order)."""
        n = len(self)
        return self.embeddings[:n], self.labels[:n]

    def reset(self) -> None:
        """Empty the queue."""
        self.ptr.zero_()
        self.count.zero_()

    def extra_repr(self) -> str:
        return f"size={self.size}, embedding_size={self.embeddings.shape[1]}, filled={len(self)}"
