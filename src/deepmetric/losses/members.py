"""One copy of a loss per member of a deep ensemble (``model.members: k``; the model:
:mod:`deepmetric.models.members`).

``L = Σ_i L_i(e_i, y)``: member i's own loss (its own proxies or learned margins) on member i's embedding
``e_i``, the i-th block of the ensemble embedding times √k (the model scales the concatenation by 1/√k).
Member i's parameters get exactly the gradient of ``L_i``, as if it were trained alone on the same batches.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from deepmetric.errors import ConfigError
from deepmetric.losses.hybrid import split_heads


class PerMemberLoss(nn.Module):
    """``Σ_i losses[i](scale·x_i, labels)`` over the column blocks ``x_i`` (``sizes``) of the embeddings; each
    member's value is kept in ``last_parts`` (``member0``, ``member1``, …) and logged. ``scale`` turns a block
    back into its member's embedding (the model's ``head.block_scale``: √k when the members L2-normalise).
    Mined indices and cross-batch references are refused: a miner or a memory on the concatenation would
    couple the members."""

    def __init__(self, losses: list[nn.Module], sizes: list[int], scale: float):
        super().__init__()
        if len(losses) != len(sizes) or len(losses) < 2:
            raise ConfigError(f"a per-member loss needs one loss per member (at least 2), got {len(losses)} for "
                              f"{len(sizes)} members")
        self.members = nn.ModuleList(losses)
        self.sizes = [int(s) for s in sizes]
        self.scale = float(scale)
        self.uses_references = bool(getattr(losses[0], "uses_references", True))
        self.wants_sample_ids = "sample_ids" in inspect.signature(losses[0].forward).parameters
        self.last_parts: dict[str, torch.Tensor] = {}

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, indices=None, ref_embeddings=None,
                ref_labels=None, sample_ids: torch.Tensor | None = None) -> torch.Tensor:
        if indices is not None or ref_embeddings is not None or ref_labels is not None:
            raise ConfigError("a deep ensemble (model.members > 1) trains each member on its own loss; mined indices "
                              "and cross-batch references are not supported: set miner.name=null and memory.size=0")
        extra = {"sample_ids": sample_ids} if self.wants_sample_ids and sample_ids is not None else {}
        blocks = split_heads(embeddings, labels, self.sizes, type(self.members[0]).__name__)
        values = [loss(x * self.scale if self.scale != 1.0 else x, labels, **extra)
                  for loss, x in zip(self.members, blocks)]
        self.last_parts = {f"member{i}": v.detach() for i, v in enumerate(values)}
        return torch.stack(values).sum()

    def extra_repr(self) -> str:
        return f"members={len(self.members)}, sizes={self.sizes}"
