"""Batch samplers (registry ``SAMPLERS``, chosen by ``sampler.name``): ``m_per_class`` (default),
``fixed_representatives`` and ``npair``.

**m per class** (:class:`MPerClassSampler`): every batch is P distinct classes x m samples. Per epoch, each
class's indices are shuffled and cut into chunks of m; the chunks of all classes are
then grouped into batches of P chunks with distinct classes, drawing classes with probability
proportional to their remaining chunks, so every sample is seen once per epoch as far as the class
sizes allow. Two documented exceptions, both drawn **with replacement** from the same class:

* a class with fewer than m samples (its chunk is padded by repeating its own samples, as
  pytorch-metric-learning's ``MPerClassSampler`` does), and the last, incomplete chunk of a class whose
  size is not a multiple of m;
* when fewer than P classes still have chunks left, the batch is completed with fresh chunks of other
  classes (those samples are seen twice in that epoch).

**Fixed representatives** (:class:`FixedRepresentativeSampler`, Can, Gürbüz & Alatan 2021): every batch
starts with one representative per class of the batch, kept for ``lifetime`` iterations.

**N-pair batches** (:class:`NPairSampler`, Sohn 2016): N = ``batch_size // 2`` distinct classes x 2
distinct images, the layout the ``npair`` loss needs.

Batches are seeded by ``(seed, epoch)``: call :meth:`set_epoch` (the trainer does) to get a new, but
reproducible, order every epoch; a resumed run therefore sees exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from deepmetric.errors import ConfigError
from deepmetric.pairing import PairRule
from deepmetric.registry import Registry
from deepmetric.validation import as_int_labels

SAMPLERS: Registry = Registry("sampler")


class BatchSampler:
    """Base of the trainer's batch samplers: iterating yields lists of data-set indices. The trainer calls
    :meth:`set_epoch` before every pass, :meth:`pair_rule` and :meth:`observe` every step, and saves
    :meth:`state_dict` in checkpoints; the defaults do nothing."""

    def set_epoch(self, epoch: int, pass_: int = 0) -> None:
        """Select the batches of ``epoch`` (``pass_`` numbers extra passes when an epoch is longer than one)."""
        self.epoch, self.pass_ = epoch, pass_

    def pair_rule(self, n: int, device: torch.device) -> PairRule | None:
        """Which rows of a batch of ``n`` pair up in pair-based losses (:mod:`deepmetric.pairing`); None = all."""
        return None

    def observe(self, indices: torch.Tensor, embeddings: torch.Tensor) -> None:
        """The data-set indices and (detached) embeddings of the batch just trained on."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _class_members(labels) -> tuple[np.ndarray, list[np.ndarray]]:
    """``(class position of every sample, indices of each class)`` for integer labels."""
    _, inverse = np.unique(as_int_labels(labels), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    return inverse, np.split(order, np.cumsum(np.bincount(inverse))[:-1])


def _classes_per_batch(batch_size: int, m: int, n_classes: int) -> int:
    if m < 1 or batch_size < 1:
        raise ConfigError(f"m and batch_size must be positive, got m={m}, batch_size={batch_size}")
    if batch_size % m:
        raise ConfigError(f"batch_size ({batch_size}) must be a multiple of m ({m})")
    per_batch = batch_size // m
    if per_batch < 2:
        raise ConfigError(
            f"batch_size // m = {per_batch}: a batch needs at least 2 classes for negatives; "
            f"raise batch_size or lower m"
        )
    if per_batch > n_classes:
        raise ConfigError(
            f"a batch of {batch_size} with m={m} needs {per_batch} classes, but the data has only {n_classes}"
        )
    return per_batch


@SAMPLERS.register("m_per_class")
class MPerClassSampler(BatchSampler):
    """Yields lists of ``batch_size`` indices: ``batch_size // m`` distinct classes, ``m`` samples each."""

    def __init__(self, labels, m: int = 4, batch_size: int = 32, seed: int = 0):
        _, self._members = _class_members(labels)  # indices of each class
        self.per_batch = _classes_per_batch(batch_size, m, len(self._members))
        self.m, self.batch_size, self.seed, self.epoch, self.pass_ = m, batch_size, seed, 0, 0
        self._chunks_per_class = np.array([-(-len(ix) // m) for ix in self._members])

    def __len__(self) -> int:
        chunks = self._chunks_per_class
        return max(-(-int(chunks.sum()) // self.per_batch), int(chunks.max()))

    def _chunk(self, rng: np.random.Generator, members: np.ndarray, start: int, perm: np.ndarray) -> np.ndarray:
        chunk = perm[start : start + self.m]
        if len(chunk) < self.m:  # pad from the same class, with replacement
            chunk = np.concatenate([chunk, rng.choice(members, self.m - len(chunk), replace=True)])
        return chunk

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch, self.pass_])
        perms = [rng.permutation(ix) for ix in self._members]
        left = self._chunks_per_class.copy()
        taken = np.zeros_like(left)
        n_classes = len(left)
        n_batches = len(self)
        for b in range(n_batches):
            live = np.flatnonzero(left)
            k = min(self.per_batch, live.size)
            # a class with as many chunks left as batches left must be in every remaining batch
            forced = live[left[live] >= n_batches - b]
            free = np.setdiff1d(live, forced)
            chosen = np.concatenate(
                [forced, rng.choice(free, size=k - forced.size, replace=False, p=left[free] / left[free].sum())]
            ) if k > forced.size else forced
            if k < self.per_batch:  # top up with other classes' fresh chunks
                others = np.setdiff1d(np.arange(n_classes), chosen)
                chosen = np.concatenate([chosen, rng.choice(others, self.per_batch - k, replace=False)])
            batch = []
            for c in chosen:
                members = self._members[c]
                if left[c]:
                    batch.append(self._chunk(rng, members, taken[c] * self.m, perms[c]))
                    taken[c] += 1
                    left[c] -= 1
                else:
                    batch.append(self._chunk(rng, members, 0, rng.permutation(members)))
            yield np.concatenate(batch).tolist()


@SAMPLERS.register("fixed_representatives")
class FixedRepresentativeSampler(BatchSampler):
    """Batches with fixed class representatives (Can, Gürbüz & Alatan, ICIP 2021, "Deep metric learning with
    alternating projections onto feasible sets", arXiv 1907.07585).

    The paper casts DML as finding a point in the intersection of per-class proximity constraints, relaxes
    them to sets that each constrain the samples of a class around **one representative**, and solves by
    alternating projections: for ``lifetime`` (T) iterations the representatives stay fixed while the network
    is trained, then they are redrawn. Each batch holds P = ``batch_size // m`` distinct classes: first the P
    representatives (one row per class, in class order of the batch), then m − 1 other samples of each class
    (so ``batch_size`` rows; m ≥ 2), as ``MPerClass(representative_lifetime)`` of ``yetigurbuz/ccp-dml``.
    :meth:`pair_rule` makes pair-based losses and miners compare **samples with representatives only** (a
    ``P(m−1) × P`` problem; a miner's hardest negative is a representative). The proximal term between
    lifetimes is the ``proximal`` regulariser (:class:`deepmetric.regularizers.ProximalRegularizer`).

    * Representatives: lifetime L uses member ``L mod n_c`` of a fixed seeded permutation of each class, so
      consecutive lifetimes use different representatives (for classes with two or more samples). Lifetimes
      count global iterations ``epoch · iterations_per_epoch + pass · len + i`` (the trainer fills in
      ``train.iterations_per_epoch``), so a lifetime may run across an epoch boundary and a resumed run sees
      the same representatives.
    * Other samples: per epoch, each class's samples are drawn from a shuffled queue refilled when empty,
      skipping the representative; a class with fewer than m − 1 others is drawn with replacement (a
      singleton class repeats its representative).
    * Classes: visited in shuffled order, all before any repeats. With ``mining`` [recon; the paper's solver
      code is not public], a batch takes the next class of that order as seed plus the P − 1 classes whose
      representatives were nearest (cosine) to the seed's when last seen in a batch (hard negative classes;
      classes not seen yet are filled from the order). The representatives' embeddings come from
      :meth:`observe` and are saved in checkpoints; with ``data.num_workers > 0`` batches are prepared a few
      steps ahead, so they use slightly older embeddings.
    """

    def __init__(self, labels, m: int = 4, batch_size: int = 32, seed: int = 0, lifetime: int = 10,
                 mining: bool = False, iterations_per_epoch: int | None = None):
        self._class_of, self._members = _class_members(labels)
        self.per_batch = _classes_per_batch(batch_size, m, len(self._members))
        if m < 2:
            raise ConfigError(f"fixed_representatives needs m >= 2 (a representative and a sample per class), got {m}")
        if lifetime < 1 or (iterations_per_epoch is not None and iterations_per_epoch < 1):
            raise ConfigError(f"fixed_representatives: lifetime and iterations_per_epoch must be >= 1, got {lifetime}, "
                              f"{iterations_per_epoch}")
        self.m, self.batch_size, self.seed, self.lifetime, self.mining = m, batch_size, seed, lifetime, mining
        self.iterations_per_epoch, self.epoch, self.pass_ = iterations_per_epoch, 0, 0
        rng = np.random.default_rng([seed, 1 << 20])
        self._rep_order = [rng.permutation(ix) for ix in self._members]
        self.class_embeddings: np.ndarray | None = None  # [C, D], NaN rows for classes not seen yet

    def __len__(self) -> int:
        return max(1, -(-len(self._class_of) // (self.per_batch * (self.m - 1))))

    def representatives(self, lifetime: int) -> np.ndarray:
        """The representative (data-set index) of every class during lifetime number ``lifetime``."""
        return np.array([order[lifetime % len(order)] for order in self._rep_order])

    def pair_rule(self, n: int, device: torch.device) -> PairRule:
        rows = torch.arange(n, device=device)
        return PairRule(anchors=rows[self.per_batch:], references=rows[: self.per_batch])

    def observe(self, indices: torch.Tensor, embeddings: torch.Tensor) -> None:
        if not self.mining:
            return
        reps = embeddings[: self.per_batch].detach().float()
        reps = torch.nn.functional.normalize(reps, dim=1).cpu().numpy()
        if self.class_embeddings is None:
            self.class_embeddings = np.full((len(self._members), reps.shape[1]), np.nan, dtype=np.float32)
        self.class_embeddings[self._class_of[indices[: self.per_batch].cpu().numpy()]] = reps

    def state_dict(self) -> dict[str, Any]:
        return {"class_embeddings": self.class_embeddings}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.class_embeddings = state.get("class_embeddings")

    def _next_class(self, rng: np.random.Generator, stream: list[int], exclude: set[int]) -> int:
        """The next class of the visiting order not in ``exclude`` (a refill starts a new shuffled round)."""
        for pos in range(len(stream) - 1, -1, -1):
            if stream[pos] not in exclude:
                return stream.pop(pos)
        stream[:0] = rng.permutation(len(self._members)).tolist()
        return self._next_class(rng, stream, exclude)

    def _classes(self, rng: np.random.Generator, stream: list[int]) -> list[int]:
        chosen = [self._next_class(rng, stream, set())]
        if self.mining and self.class_embeddings is not None and not np.isnan(self.class_embeddings[chosen[0]]).any():
            sims = self.class_embeddings @ self.class_embeddings[chosen[0]]
            sims[np.isnan(sims)] = -np.inf
            sims[chosen[0]] = -np.inf
            near = np.argsort(-sims, kind="stable")[: self.per_batch - 1]
            chosen += [int(c) for c in near if np.isfinite(sims[c])]
        while len(chosen) < self.per_batch:
            chosen.append(self._next_class(rng, stream, set(chosen)))
        return chosen

    def _others(self, rng: np.random.Generator, queues: list[list[int]], c: int, rep: int) -> list[int]:
        """m − 1 samples of class c other than its representative ``rep``."""
        others = self._members[c][self._members[c] != rep]
        k = self.m - 1
        if others.size < k:
            return rng.choice(others, k, replace=True).tolist() if others.size else [int(rep)] * k
        out: list[int] = []
        while len(out) < k:
            if not queues[c]:
                queues[c] = rng.permutation(self._members[c]).tolist()
            index = queues[c].pop()
            if index != rep:
                out.append(index)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch, self.pass_])
        first = self.epoch * (self.iterations_per_epoch or len(self)) + self.pass_ * len(self)
        queues: list[list[int]] = [[] for _ in self._members]
        stream: list[int] = []
        for i in range(len(self)):
            reps = self.representatives((first + i) // self.lifetime)
            chosen = self._classes(rng, stream)
            batch = [int(reps[c]) for c in chosen]
            for c in chosen:
                batch += self._others(rng, queues, c, int(reps[c]))
            yield batch


@SAMPLERS.register("npair")
class NPairSampler(BatchSampler):
    """N-pair batches (Sohn, NeurIPS 2016, "Improved deep metric learning with multi-class N-pair loss
    objective"): N = ``batch_size // 2`` distinct classes x 2 distinct images each, yielded as
    ``[a_1, p_1, a_2, p_2, ...]`` (the first image of a class is its anchor, the second its positive; see
    :func:`deepmetric.losses.pair.npair_indices`).

    Each class keeps a shuffled queue of its images that is refilled when empty (never pairing an image with
    itself); classes are visited in shuffled order, so all classes appear before any repeats. An epoch is
    ``number of images // batch_size`` batches. ``batch_size`` must be even, and every class needs at least
    2 images: a class with one image is a :class:`ConfigError` naming it (remove such classes from the
    training split), as is a batch with more classes than the data has.
    """

    def __init__(self, labels, batch_size: int = 64, seed: int = 0):
        labels = as_int_labels(labels)
        classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        if batch_size % 2:
            raise ConfigError(f"npair batches are N classes x 2 images: batch_size must be even, got {batch_size}")
        if (counts < 2).any():
            raise ConfigError(
                f"N-pair batches need 2 distinct images per class; {int((counts < 2).sum())} classes have one "
                f"(e.g. {classes[counts < 2][:5].tolist()}). Remove them from the training split"
            )
        self.num_pairs = batch_size // 2
        if not 2 <= self.num_pairs <= classes.size:
            raise ConfigError(f"npair batch_size must be in [4, {2 * classes.size}] (2 x the number of classes), "
                              f"got {batch_size}")
        self.batch_size, self.seed, self.epoch, self.pass_ = batch_size, seed, 0, 0
        order = np.argsort(inverse, kind="stable")
        self._members = np.split(order, np.cumsum(counts)[:-1])

    def __len__(self) -> int:
        return max(1, sum(len(m) for m in self._members) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch, self.pass_])
        queues = [rng.permutation(m).tolist() for m in self._members]
        stream: list[int] = []
        for _ in range(len(self)):
            batch_classes: list[int] = []
            while len(batch_classes) < self.num_pairs:
                if not stream:
                    stream = rng.permutation(len(self._members)).tolist()
                c = stream.pop()
                if c in batch_classes:  # only at a refill boundary: keep it for the next batch
                    stream.insert(0, c)
                    continue
                batch_classes.append(c)
            batch = []
            for c in batch_classes:
                batch.extend(self._pair(rng, queues, c))
            yield batch

    def _pair(self, rng: np.random.Generator, queues: list[list[int]], c: int) -> list[int]:
        q = queues[c]
        if len(q) >= 2:
            return [q.pop(), q.pop()]
        first = q.pop() if q else None
        members = self._members[c]
        refill = rng.permutation(members if first is None else members[members != first]).tolist()
        queues[c] = refill
        return [first if first is not None else refill.pop(), refill.pop()]


class DistributedBatchSampler(BatchSampler):
    """Rank ``rank``'s share of ``sampler``'s batches in data-parallel training over ``world_size`` ranks.

    Every rank builds the same epoch plan (the wrapped sampler, seeded by ``(seed, epoch, pass)``) and takes
    its batches ``rank, rank + W, rank + 2W, ...``: each rank's batch keeps the wrapped layout (P classes x m),
    and the W batches of one step are W consecutive batches of the plan, so together the ranks go through the
    epoch once. A plan of ``n`` batches gives ``ceil(n / W)`` steps; when ``W`` does not divide ``n``, the last
    step's missing batches are the first of the plan again (every rank must run the same number of steps, or
    the collectives hang). The trainer's global batch is the W local batches in rank order: :meth:`pair_rule`
    and :meth:`observe` apply the wrapped sampler's rule to each rank's block of it. A sampler counting
    iterations (fixed representatives' lifetimes) counts the plan's batches, W per step.
    """

    def __init__(self, sampler: BatchSampler, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.sampler, self.rank, self.world_size = sampler, rank, world_size

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.world_size)

    def set_epoch(self, epoch: int, pass_: int = 0) -> None:
        super().set_epoch(epoch, pass_)
        self.sampler.set_epoch(epoch, pass_)

    def __iter__(self) -> Iterator[list[int]]:
        # lazily, W batches of the plan per step: a sampler that reads state (fixed representatives' mining)
        # draws each batch as late as in one process
        first: list[list[int]] = []  # the plan's first W batches, to top up the last step
        step: list[list[int]] = []
        count = 0
        for batch in self.sampler:
            count += 1
            if len(first) < self.world_size:
                first.append(batch)
            step.append(batch)
            if len(step) == self.world_size:
                yield step[self.rank]
                step = []
        if step:  # position j of the last step is batch (n - k + j) mod n of the plan, k = len(step)
            yield (step + [first[(j - len(step)) % count] for j in range(len(step), self.world_size)])[self.rank]

    def pair_rule(self, n: int, device: torch.device) -> PairRule | None:
        block = n // self.world_size
        rule = self.sampler.pair_rule(block, device)
        if rule is None:
            return None

        def tile(rows: torch.Tensor | None, shift: bool) -> torch.Tensor | None:
            if rows is None:
                return None
            return torch.cat([rows.to(device) + (r * block if shift else 0) for r in range(self.world_size)])

        return PairRule(anchors=tile(rule.anchors, True), references=tile(rule.references, True),
                        positives=tile(rule.positives, False), origin=tile(rule.origin, True))

    def observe(self, indices: torch.Tensor, embeddings: torch.Tensor) -> None:
        for ids, emb in zip(indices.chunk(self.world_size), embeddings.chunk(self.world_size)):
            self.sampler.observe(ids, emb)

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


def from_config(config: Any, labels) -> BatchSampler:
    """The sampler of a :class:`~deepmetric.training.config.RunConfig` over the training ``labels``
    (``sampler.name`` and its keywords; ``iterations_per_epoch`` filled in from ``train``)."""
    # npair takes no m: its batches have 2 per class by construction
    context = {"iterations_per_epoch": config.train.iterations_per_epoch, "m": config.sampler.m}
    return SAMPLERS.build_in_context(config.sampler.name, context, labels=labels, batch_size=config.sampler.batch_size,
                                     seed=config.seed, **config.sampler.kwargs())
