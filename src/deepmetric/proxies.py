"""Proxy re-placement during training: CCP-DML (Gürbüz, Can & Alatan, arXiv 2209.09060).

CCP casts DML as finding a point in the intersection of per-class *chance-constraint* sets (each class's
samples must lie close to one of its proxies with high probability) and solves it by iterative
projections: train the network with the proxies fixed in role, then project the proxies onto the data by
re-placing them with embeddings of deliberately chosen training samples (k-center), and repeat, each
time proximally regularising the network towards the best weights so far.

:class:`CCPProxyReplacement` is a trainer :class:`~deepmetric.hooks.Hook` that works with every
proxy loss (any :class:`~deepmetric.losses.proxy.ProxyLoss` in the objective; proxy ``c·K + k`` is proxy k
of class c). Enable it from a config with ``proxies: {ccp: true}``.

**Selection rule (k-center, per class)** [reference code]: a pool of ``pool`` (b) random training images
per class is embedded in inference mode (without random augmentation where the data set allows it); every pool embedding x gets the score
``s(x) = min_p ‖x − p‖²`` over the seed proxies; K times, the pool embedding with the largest score is
picked and ``s ← min(s, ‖x − x*‖²)``. The picks (real embeddings) become the new proxies. Embeddings and
seeds are compared after the reference's soft normalisation ``v ↦ v / max(1, ‖v‖)``; the proxies are set
to the picked embeddings as the model outputs them.

**Schedule** [reference code]:

1. Before the first epoch the proxies are placed by k-center from zero seeds (the first pick per class is
   its largest-norm pool embedding), and λ = 0.
2. At each evaluation the hook reads ``train.select_metric`` on the selection split (validation classes;
   MAP@R in the paper) and keeps the proxies of the best evaluation (and the network weights θ̄ when
   ``proximal`` > 0).
3. When the metric has not improved by ``min_delta`` (1e-5) for ``patience`` (3) evaluations, the proxies
   are re-placed by k-center **seeded with the best proxies**, θ̄ ← the best weights (live weights are not
   rewound) and λ ← ``proximal`` (2e-4).

``every=N`` replaces step 2-3 by a fixed schedule (re-place every N epochs, seeded with the current
proxies) for runs without validation classes. Deviations: evaluations happen at the trainer's
``eval_every`` epochs, not every 25 iterations; the proximal term ``(λ/2)‖θ − θ̄‖²`` is applied decoupled,
after each optimiser step (``θ ← θ − lr·λ(θ − θ̄)``, exactly its SGD step), so it pulls the network only,
never the proxies; the reference's early stop (60 evaluations without improvement) is left to the
schedule. The optimiser state of re-placed proxies is kept (as the reference) unless ``reset_state``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from deepmetric.data.base import Subset
from deepmetric.errors import ConfigError
from deepmetric.losses.proxy import ProxyLoss
from deepmetric.hooks import Hook, TrainerView
from deepmetric.inference import embed


def soft_normalize(v: torch.Tensor) -> torch.Tensor:
    """``v`` if ``‖v‖ ≤ 1``, else ``v/‖v‖`` (row-wise): CCP's soft normalisation."""
    return v / v.norm(dim=-1, keepdim=True).clamp(min=1.0)


def kcenter(pool: torch.Tensor, valid: torch.Tensor, seeds: torch.Tensor, k: int) -> torch.Tensor:
    """Farthest-first picks per class: ``pool [C, b, D]`` (``valid [C, b]`` marks real rows), ``seeds [C, S, D]``
    (S ≥ 0). Returns ``[C, k]`` pool positions, chosen greedily by ``argmax_x min(‖x − seed‖², ‖x − picks‖²)``
    (ties -> lowest position). A class with fewer than k valid rows repeats picks."""
    n_cls, b, _ = pool.shape
    if seeds.shape[1]:
        score = torch.cdist(pool, seeds).pow(2).amin(2)
    else:
        score = torch.full((n_cls, b), float("inf"), dtype=pool.dtype, device=pool.device)
    score = score.masked_fill(~valid, float("-inf"))
    picks = torch.empty(n_cls, k, dtype=torch.long, device=pool.device)
    rows = torch.arange(n_cls, device=pool.device)
    for j in range(k):  # k is the number of proxies per class (a handful); vectorised over classes
        pick = score.argmax(1)
        picks[:, j] = pick
        dist = (pool - pool[rows, pick][:, None, :]).pow(2).sum(2)
        score = torch.minimum(score, dist.masked_fill(~valid, float("-inf")))
    return picks


def class_pool(labels: np.ndarray, num_classes: int, size: int, generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``size`` random item indices per class (labels ``0..C-1``): ``(index [C, size], valid [C, size])``."""
    keys = torch.rand(len(labels), generator=generator).numpy()
    order = np.lexsort((keys, labels))  # by class, random within each class
    sorted_labels = labels[order]
    start = np.searchsorted(sorted_labels, np.arange(num_classes))
    count = np.searchsorted(sorted_labels, np.arange(num_classes), side="right") - start
    slots = np.arange(size)[None, :]
    valid = slots < count[:, None]
    pos = np.minimum(start[:, None] + np.minimum(slots, np.maximum(count[:, None] - 1, 0)), len(order) - 1)
    return order[pos], valid


class CCPProxyReplacement(Hook):
    """CCP-DML proxy re-placement (see the module docstring for the rule and the schedule).

    State (saved in checkpoints): number of placements, best metric value and evaluations since, λ, the
    best proxies, θ̄, and the training-set indices of the samples chosen at the last placement
    (``chosen[name] [C·K]``, per proxy loss of the objective).
    """

    def __init__(
        self,
        every: int | None = None,
        patience: int = 3,
        min_delta: float = 1e-5,
        pool: int = 12,
        proximal: float = 2e-4,
        reset_state: bool = False,
        seed: int = 0,
    ):
        self.every, self.patience, self.min_delta = every, patience, min_delta
        self.pool, self.proximal, self.reset_state, self.seed = pool, proximal, reset_state, seed
        self.placements = 0
        self.best: float | None = None
        self.stale = 0
        self.lam = 0.0
        self.best_proxies: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        self.chosen: dict[str, torch.Tensor] = {}
        self._pool_data = None  # the training split without augmentation, built at the first placement

    # ------------------------------------------------------------------------------------ hook events
    def on_train_start(self, trainer: TrainerView) -> None:
        if self.every is None and trainer.select_on == "last":
            raise ConfigError(
                "proxies.ccp re-places the proxies when the validation metric stops improving: set "
                "data.val_classes (or train.select_on=test), or a fixed schedule with proxies.every"
            )
        if self.placements == 0:  # not on resume: the restored state already has the placement
            self.replace(trainer, seeded=False)

    def on_batch_end(self, trainer: TrainerView, epoch: int, iteration: int, loss: float) -> None:
        if self.lam == 0 or not self.anchor:
            return
        named = dict(trainer.model.named_parameters())
        with torch.no_grad():
            for group in trainer.optimizer.param_groups:
                ids = {id(p) for p in group["params"]}
                for name, p in named.items():
                    if id(p) in ids and name in self.anchor:
                        p.sub_(group["lr"] * self.lam * (p - self.anchor[name].to(p.device)))

    def on_epoch_end(self, trainer: TrainerView, epoch: int, metrics: dict[str, Any]) -> None:
        if epoch >= trainer.config.train.epochs:
            return
        if self.every is not None:
            if epoch % self.every == 0:
                self.replace(trainer, seeded=True)
            return
        key = f"{trainer.select_on}/{trainer.config.train.select_metric}"
        if key not in metrics:  # no evaluation this epoch
            return
        value = float(metrics[key])
        if self.best is None or value > self.best + self.min_delta:
            self.best, self.stale = value, 0
            self.best_proxies = {n: m.proxies.detach().clone() for n, m in self.targets(trainer).items()}
            if self.proximal > 0:
                self.anchor = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
            return
        self.stale += 1
        if self.stale >= self.patience:
            self.replace(trainer, seeded=True)
            self.lam, self.stale = self.proximal, 0

    # ------------------------------------------------------------------------------------ placement
    @staticmethod
    def targets(trainer: TrainerView) -> dict[str, ProxyLoss]:
        found = {n: m for n, m in trainer.objective.named_modules() if isinstance(m, ProxyLoss)}
        if not found:
            raise ConfigError("proxies.ccp re-places the proxies of a proxy loss, but the objective has none "
                              "(e.g. loss.name=proxy_anchor)")
        return found

    def replace(self, trainer: TrainerView, seeded: bool) -> None:
        """Re-place every proxy loss's proxies by k-center picks among freshly embedded pool samples."""
        targets = self.targets(trainer)
        if self._pool_data is None:
            self._pool_data = trainer.unaugmented_train()
        train = self._pool_data
        labels = trainer.label_map[torch.as_tensor(train.labels)].numpy()
        num_classes = int(labels.max()) + 1
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.placements)
        index, valid = class_pool(labels, num_classes, self.pool, generator)
        flat = index.reshape(-1)
        cfg = trainer.config
        emb, _ = embed(trainer.model, Subset(train, flat), cfg.eval.batch_size, trainer.device, amp=trainer.amp_dtype)
        emb = emb.view(num_classes, self.pool, -1)
        valid_t = torch.as_tensor(valid)
        for name, loss in targets.items():
            k = loss.proxies_per_class
            if loss.num_classes != num_classes:
                raise ConfigError(f"{name} has {loss.num_classes} classes but the training split has {num_classes}")
            if seeded:
                seeds = self.best_proxies.get(name, loss.proxies.detach()).view(num_classes, k, -1)
            else:
                seeds = torch.zeros(num_classes, 1, emb.shape[2])
            picks = kcenter(soft_normalize(emb), valid_t, soft_normalize(seeds.float().cpu()), k)
            rows = torch.arange(num_classes)[:, None]
            with torch.no_grad():
                loss.proxies.copy_(emb[rows, picks].reshape(num_classes * k, -1).to(loss.proxies))
            if self.reset_state:
                trainer.optimizer.state.pop(loss.proxies, None)
            self.chosen[name] = torch.as_tensor(index)[rows, picks].reshape(-1)
        self.placements += 1

    # ------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"placements": self.placements, "best": self.best, "stale": self.stale, "lam": self.lam,
                "best_proxies": self.best_proxies, "anchor": self.anchor, "chosen": self.chosen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.placements, self.best, self.stale, self.lam = state["placements"], state["best"], state["stale"], state["lam"]
        self.best_proxies, self.anchor, self.chosen = state["best_proxies"], state["anchor"], state["chosen"]
