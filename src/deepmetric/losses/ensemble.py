"""Ensemble of losses with learnable weights (Zabihzadeh, Alitbi & Mousavirad 2021, arXiv 2107.01130; official
code ``d-zabihzadeh/DML-Ensemble-of-Losses``, ``WEL_DML.py``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deepmetric.errors import ConfigError
from deepmetric.losses import build_with_context, register
from deepmetric.losses.hybrid import head_sizes, split_heads


@register("ensemble")
class EnsembleLoss(nn.Module):
    """Weighted ensemble of any m registered losses, the weights learned end to end (Zabihzadeh et al. 2021):

    ``L = Σ_k w_k·(L̄/L̄_k)·L_k + 100·η·(Σ_k w_k − 1)²``,  ``w_k = c_k² + 1/(4m)``,

    so every ``w_k ≥ 1/(4m)``; the c_k are parameters (trained with the loss group's learning rate), initialised
    so that ``w = prior / Σ prior`` (uniform by default; the paper's prior for its four losses is [2, 1, 2, 3]).
    ``L̄_k`` is the running **cumulative** mean of loss k over the training steps so far (this one included)
    and ``L̄ = mean_k L̄_k``: each loss enters at a common scale. The means are buffers (saved in checkpoints);
    they are updated in training mode only. η = 100 (the code's default). The losses should be positive (the
    normalisation divides by their means).

    **Shared encoder** (default; the paper's WEL): every loss sees the whole embedding, which is also what
    is evaluated. **Per-loss heads** (``split_heads=True``; the paper's WEDL): the embedding is the
    concatenation of m heads (``model.head: multi_head`` with ``head_kwargs: {global_heads: m, parts: 0}``),
    loss k sees head k (L2-normalised), a diversity term ``diversity·[2 − mean_{k<k'} mean_b ‖e_k − e_k'‖]_+``
    (λ = 0.01) keeps the heads apart, and the learned weights are copied into the head so that the evaluated
    embedding is ``concat_k √(w_k/Σw)·e_k`` (squared distance ∝ ``Σ_k w_k d_k²``, the paper's evaluation
    embedding). The paper's heads each carry their own attention module; ours share the backbone map.

    ``losses``: registry keys or ``{name: key, **keywords}``; ``num_classes``/``embedding_size`` are filled in.
    The members compare the samples of the batch by label (mined indices and a cross-batch memory are not used).
    Each step's ``L_k`` and ``w_k`` are kept in ``last_parts`` (``0_<name>``, ``w0_<name>``, …) and logged.
    """

    uses_references = False

    def __init__(
        self,
        losses: list[str | dict[str, Any]],
        num_classes: int | None = None,
        embedding_size: int | None = None,
        model: nn.Module | None = None,
        prior: list[float] | None = None,
        eta: float = 100.0,
        split_heads: bool = False,
        diversity: float = 0.01,
    ):
        super().__init__()
        m = len(losses)
        if m < 2:
            raise ConfigError(f"ensemble needs at least two losses, got {losses!r}")
        prior_t = torch.ones(m, dtype=torch.float64) if prior is None else torch.tensor(prior, dtype=torch.float64)
        if prior_t.shape != (m,) or not bool((prior_t > 0).all()):
            raise ConfigError(f"ensemble: prior must give one positive value per loss ({m}), got {prior}")
        self.floor = 1 / (4 * m)
        start = prior_t / prior_t.sum() - self.floor
        if bool((start < 0).any()):
            raise ConfigError(f"ensemble: the prior {prior} gives a loss a weight below the floor 1/(4m) = {self.floor:g}")
        self.c = nn.Parameter(start.sqrt().float())
        self.eta, self.split, self.diversity = float(eta), bool(split_heads), float(diversity)
        self.sizes = None
        self._set_head_weights = None
        if self.split:
            if embedding_size is None:
                raise ConfigError("ensemble with split_heads needs embedding_size (filled in from the model config)")
            self.sizes = head_sizes(embedding_size, None if model is not None else m, model)
            if len(self.sizes) != m:
                raise ConfigError(
                    f"ensemble with split_heads gives each of its {m} losses its own head, but the model has "
                    f"{len(self.sizes)}; use model.head=multi_head with head_kwargs={{global_heads: {m}, parts: 0}}")
            self._set_head_weights = getattr(getattr(model, "head", None), "set_head_weights", None)
        dims = self.sizes or [embedding_size] * m
        self.members = nn.ModuleList(build_with_context(spec, num_classes=num_classes, embedding_size=d)
                                     for spec, d in zip(losses, dims))
        self.names = [spec if isinstance(spec, str) else spec.get("name", "?") for spec in losses]
        self.register_buffer("means", torch.zeros(m, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @property
    def weights(self) -> torch.Tensor:
        """``w_k = c_k² + 1/(4m)``."""
        return self.c**2 + self.floor

    def member_losses(self, embeddings: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
        """``[L_k]``: each loss on the whole embedding, or on its own head (``split_heads``)."""
        if not self.split:
            return [loss(embeddings, labels) for loss in self.members]
        heads = [nn.functional.normalize(h, dim=1) for h in split_heads(embeddings, labels, self.sizes, "ensemble")]
        return [loss(h, labels) for loss, h in zip(self.members, heads)]

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, indices: Any = None) -> torch.Tensor:
        if indices is not None:
            raise ConfigError("ensemble compares the samples of the batch by label and does not use mined indices; "
                              "remove the miner (miner.name=null)")
        values = self.member_losses(embeddings, labels)
        current = torch.stack([v.detach() for v in values]).to(self.means)
        if self.training:
            self.means.mul_(self.steps).add_(current).div_(self.steps + 1)
            self.steps += 1
        means = self.means if int(self.steps) > 0 else current
        scale = (means.mean() / means.clamp(min=torch.finfo(torch.float32).tiny)).float()
        w = self.weights
        total = sum(w[k] * scale[k] * v for k, v in enumerate(values)) + 100 * self.eta * (w.sum() - 1) ** 2
        self.last_parts = {**{f"{k}_{n}": v.detach() for k, (n, v) in enumerate(zip(self.names, values))},
                           **{f"w{k}_{n}": w[k].detach() for k, n in enumerate(self.names)}}
        if self.split:
            total = total + self.diversity * self._diversity(embeddings, labels)
            if self.training and self._set_head_weights is not None:
                self._set_head_weights(w)
        return total

    def _diversity(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``[2 − mean over head pairs k < k' of mean_b ‖e_k − e_k'‖]_+`` (WEDL's ``DistLoss``)."""
        heads = torch.stack([nn.functional.normalize(h.float(), dim=1)
                             for h in split_heads(embeddings, labels, self.sizes, "ensemble")])  # [m, B, d]
        k, k2 = torch.triu_indices(len(self.members), len(self.members), offset=1)
        return torch.relu(2 - (heads[k] - heads[k2]).norm(dim=2).mean())

    def extra_repr(self) -> str:
        w = ", ".join(f"{n}={v:.3f}" for n, v in zip(self.names, self.weights.detach().tolist()))
        return f"weights=({w}), eta={self.eta}, split_heads={self.split}"
