"""Embedding heads (registry ``HEADS``: ``linear``, ``multi_head``) and the full embedding model (backbone -> head).

A head is built as ``HEADS.build(name, in_features=…, embedding_size=…, batch_norm=…, normalize=…, **head_kwargs)``
(``model.head`` and ``model.head_kwargs`` in a config), maps backbone features to the embedding, returns
``(raw, embedding)`` with ``return_raw=True``, and says how its output splits into per-head embeddings in
``embedding_sizes`` (one entry for a single head); losses built on several heads (``hybrid``, ``ensemble``) read it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepmetric.errors import ConfigError, suggest
from deepmetric.registry import Registry

HEADS: Registry[nn.Module] = Registry("head")


@HEADS.register("linear")
class EmbeddingHead(nn.Module):
    """``z = W f + b`` to ``embedding_size``, then optional BatchNorm1d and optional L2-normalisation.

    ``init="default"`` is PyTorch's Linear initialisation (a random projection of the features);
    ``init="identity"`` sets ``W`` to the identity (rows ``i < min(in_features, embedding_size)`` pass
    feature ``i`` through, any further rows and columns are zero) and ``b = 0``, so the untrained embedding
    is the backbone's features themselves. With ``embedding_size == in_features`` nothing is thrown away at
    the start: on ``digits`` a random 64-d projection of ``small_cnn``'s 512 flattened features scores
    below the features themselves on the unseen classes, and training starts from the better point.
    """

    INITS = ("default", "identity")

    def __init__(self, in_features: int, embedding_size: int = 128, batch_norm: bool = False, normalize: bool = True,
                 init: str = "default"):
        super().__init__()
        if init not in self.INITS:
            raise ConfigError(f"unknown head init {init!r}.{suggest(init, self.INITS)} Valid: {', '.join(self.INITS)}")
        self.embedding_size, self.normalize = embedding_size, normalize
        self.linear = nn.Linear(in_features, embedding_size)
        if init == "identity":
            with torch.no_grad():
                self.linear.weight.copy_(torch.eye(embedding_size, in_features))
                self.linear.bias.zero_()
        self.bn = nn.BatchNorm1d(embedding_size) if batch_norm else nn.Identity()

    @property
    def embedding_sizes(self) -> tuple[int, ...]:
        return (self.embedding_size,)

    def forward(self, features: torch.Tensor, return_raw: bool = False):
        """The embedding; with ``return_raw`` also the vector before L2-normalisation: ``(raw, embedding)``
        (regularisers on the norm, e.g. SEC, need it)."""
        z = self.bn(self.linear(features))
        out = F.normalize(z, dim=-1) if self.normalize else z
        return (z, out) if return_raw else out


class EmbeddingModel(nn.Module):
    """``head(backbone(x))``. ``freeze_bn`` keeps every BatchNorm of the backbone in eval mode while training
    (running statistics and affine weights frozen), as DML papers do with ImageNet backbones."""

    def __init__(self, backbone: nn.Module, head: EmbeddingHead, freeze_bn: bool = False):
        super().__init__()
        self.backbone, self.head, self.freeze_bn = backbone, head, freeze_bn
        if freeze_bn:
            for m in self._backbone_bns():
                for p in m.parameters():
                    p.requires_grad_(False)

    def _backbone_bns(self):
        return (m for m in self.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))

    def train(self, mode: bool = True) -> EmbeddingModel:
        super().train(mode)
        if mode and self.freeze_bn:
            for m in self._backbone_bns():
                m.eval()
        return self

    def forward(self, x: torch.Tensor, return_raw: bool = False):
        """``head(backbone(x))``; ``return_raw=True`` gives ``(pre-normalisation, embedding)``."""
        return self.head(self.backbone(x), return_raw=return_raw)
