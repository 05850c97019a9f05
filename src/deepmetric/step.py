"""One training step's inputs, as every objective term (loss or regulariser) receives them."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from deepmetric.augment import ClassMix
from deepmetric.pairing import PairRule, pair_indices


@dataclass
class StepInputs:
    """Everything a term may use in one training step (``N = B`` + synthetic rows of an augmenter).

    ``embeddings [N, D]``/``labels [N]`` (0..C-1) are what losses see; ``is_synthetic [N]`` marks rows an
    augmenter added; ``raw [B, D]`` is the head output before L2-normalisation and ``inputs`` the batch
    given to the model (real rows only); ``sample_ids [B]`` are the data-set indices of the real rows;
    ``indices`` the miner's tuples (or None); ``memory`` the cross-batch memory's ``(embeddings,
    labels)`` when it is in use and non-empty; ``epoch`` is 1-based, of ``epochs``; ``pairs`` and ``classes``
    say which rows pair up and which synthetic classes exist (see the module docstring), ``indices`` then
    being over ``pairs``' anchors and references. In a distributed run every field holds the global batch
    (all ranks' rows in rank order; :mod:`deepmetric.distributed`) except ``inputs``, which are this rank's.
    """

    embeddings: torch.Tensor
    labels: torch.Tensor
    raw: torch.Tensor
    inputs: torch.Tensor
    sample_ids: torch.Tensor
    is_synthetic: torch.Tensor
    model: nn.Module
    epoch: int
    epochs: int
    indices: tuple[torch.Tensor, ...] | None = None
    memory: tuple[torch.Tensor, torch.Tensor] | None = None
    pairs: PairRule | None = None
    classes: ClassMix | None = None

    def real_rows(self, miner: nn.Module | None, pairs: PairRule | None = None) -> StepInputs:
        """This step restricted to its real rows (the first ``B``), mined anew with ``miner`` under the rule
        ``pairs`` (the sampler's), without synthetic classes."""
        b = self.sample_ids.shape[0]
        x, y = self.embeddings[:b], self.labels[:b]
        return replace(self, embeddings=x, labels=y, is_synthetic=self.is_synthetic[:b],
                       indices=pair_indices(miner, x, y, pairs), pairs=pairs, classes=None)
