"""Which rows of a training batch pair up in pair-based losses and miners.

Most batches pair every row with every other row. Two things change that:

* an **augmenter** (:mod:`deepmetric.augment`) appends synthetic rows that some papers keep from being
  anchors (IAA, Embedding Expansion), from being positives (Embedding Expansion's hardest *real* positive) or
  from being positives of the anchor they were copied from (IAA's code);
* the **fixed-representative sampler** (:class:`deepmetric.samplers.FixedRepresentativeSampler`) puts one
  representative per class in the batch, and the loss compares only samples with representatives.

A :class:`PairRule` states this. The trainer computes the step's pairs with :func:`pair_indices` and the
objective (:class:`deepmetric.training.objective.Objective`) then calls each pair-based loss as
``loss(embeddings[anchors], labels[anchors], indices, ref_embeddings=embeddings[references],
ref_labels=labels[references])``: the anchors are the rows, the references the columns of the loss's
matrix, and ``indices`` hold exactly the admissible pairs — so every pair-based loss and miner works
unchanged, and a loss that averages over anchors divides by the number of real anchors.

With a miner, the miner runs on that anchor x reference problem (so a hardest negative is the hardest over
all references) and the tuples whose positive is not admissible (the anchor itself, its own copies, or a
row barred from being a positive) are dropped afterwards. Without a miner the indices list every admissible
positive pair and every negative pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from deepmetric.losses.base import Indices, to_pairs


@dataclass
class PairRule:
    """Anchors, references and admissible positives among the N rows of a batch.

    * ``anchors [A]`` / ``references [R]``: row indices (``None`` = every row);
    * ``positives [N]`` (bool): rows that may be a positive of an anchor (``None`` = every row); a row is
      never its own positive;
    * ``origin [N]`` (long): the row each row was made from (its own index for real rows); when given, a
      row made from the anchor is not its positive (``None`` = no such exclusion).

    Negatives are all references with a different label.
    """

    anchors: torch.Tensor | None = None
    references: torch.Tensor | None = None
    positives: torch.Tensor | None = None
    origin: torch.Tensor | None = None

    def rows(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(anchors, references)`` as index tensors over ``n`` rows."""
        every = torch.arange(n, device=device)
        return (every if self.anchors is None else self.anchors.to(device),
                every if self.references is None else self.references.to(device))

    def admissible(self, a_rows: torch.Tensor, r_rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Whether reference row ``r_rows[k]`` may be a positive of anchor row ``a_rows[k]`` (broadcasting)."""
        ok = (labels[a_rows] == labels[r_rows]) & (a_rows != r_rows)
        if self.positives is not None:
            ok = ok & self.positives[r_rows]
        if self.origin is not None:
            ok = ok & (self.origin[r_rows] != a_rows)
        return ok


def pair_indices(
    miner: nn.Module | None, embeddings: torch.Tensor, labels: torch.Tensor, rule: PairRule | None
) -> Indices | None:
    """The step's index tuples: the miner's on the whole batch without a rule (``None`` without a miner),
    else tuples over ``(anchors, references)`` of ``rule`` (anchor indices into the anchor rows, others into
    the reference rows) holding only admissible pairs (see the module docstring)."""
    if rule is None:
        return miner(embeddings, labels) if miner is not None else None
    a_rows, r_rows = rule.rows(labels.shape[0], labels.device)
    if miner is None:
        pos = rule.admissible(a_rows[:, None], r_rows[None, :], labels)
        neg = labels[a_rows][:, None] != labels[r_rows][None, :]
        return (*pos.nonzero(as_tuple=True), *neg.nonzero(as_tuple=True))
    mined = miner(embeddings[a_rows], labels[a_rows], embeddings[r_rows], labels[r_rows])
    a, p = mined[0], mined[1]
    keep = rule.admissible(a_rows[a], r_rows[p], labels)
    if len(mined) == 3:
        return tuple(t[keep] for t in mined)
    a1, p, a2, n = to_pairs(mined)
    return a1[keep], p[keep], a2, n
