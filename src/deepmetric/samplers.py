"""Batch samplers. The m-per-class sampler builds every batch from P distinct classes x m samples.

Per epoch, each class's indices are shuffled and cut into chunks of m; the chunks of all classes are
then grouped into batches of P chunks with distinct classes, drawing classes with probability
proportional to their remaining chunks, so every sample is seen once per epoch as far as the class
sizes allow. Two documented exceptions, both drawn **with replacement** from the same class:

* a class with fewer than m samples (its chunk is padded by repeating its own samples, as
  pytorch-metric-learning's ``MPerClassSampler`` does), and the last, incomplete chunk of a class whose
  size is not a multiple of m;
* when fewer than P classes still have chunks left, the batch is completed with fresh chunks of other
  classes (those samples are seen twice in that epoch).

Batches are seeded by ``(seed, epoch)``: call :meth:`set_epoch` (the trainer does) to get a new, but
reproducible, order every epoch; a resumed run therefore sees exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from deepmetric.errors import ConfigError
from deepmetric.validation import as_int_labels


class MPerClassSampler:
    """Yields lists of ``batch_size`` indices: ``batch_size // m`` distinct classes, ``m`` samples each."""

    def __init__(self, labels, m: int = 4, batch_size: int = 32, seed: int = 0):
        labels = as_int_labels(labels)
        if m < 1 or batch_size < 1:
            raise ConfigError(f"m and batch_size must be positive, got m={m}, batch_size={batch_size}")
        if batch_size % m:
            raise ConfigError(f"batch_size ({batch_size}) must be a multiple of m ({m})")
        classes, inverse = np.unique(labels, return_inverse=True)
        self.per_batch = batch_size // m
        if self.per_batch < 2:
            raise ConfigError(
                f"batch_size // m = {self.per_batch}: a batch needs at least 2 classes for negatives; "
                f"raise batch_size or lower m"
            )
        if self.per_batch > classes.size:
            raise ConfigError(
                f"a batch of {batch_size} with m={m} needs {self.per_batch} classes, "
                f"but the data has only {classes.size}"
            )
        self.m, self.batch_size, self.seed, self.epoch, self.pass_ = m, batch_size, seed, 0, 0
        order = np.argsort(inverse, kind="stable")
        bounds = np.cumsum(np.bincount(inverse))
        self._members = np.split(order, bounds[:-1])  # indices of each class
        self._chunks_per_class = np.array([-(-len(ix) // m) for ix in self._members])

    def set_epoch(self, epoch: int, pass_: int = 0) -> None:
        """Select the batches of ``epoch`` (``pass_`` numbers extra passes when an epoch is longer than one)."""
        self.epoch, self.pass_ = epoch, pass_

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
