"""N-pair batches (Sohn, NeurIPS 2016): N distinct classes × 2 distinct images per batch.

The first image of each class in a batch is its anchor, the second its positive (see
:func:`deepmetric.losses.pair.npair_indices`). Each class keeps a shuffled queue of its images that is
refilled when empty (never pairing an image with itself); classes are visited in shuffled order, so all
classes appear before any repeats. Batches are seeded by ``(seed, epoch)``; call :meth:`set_epoch`.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from deepmetric.errors import ConfigError
from deepmetric.validation import as_int_labels


class NPairSampler:
    """Yields lists of ``2 * num_pairs`` indices: ``[a_1, p_1, a_2, p_2, ...]``, one class per pair."""

    def __init__(self, labels, num_pairs: int = 32, seed: int = 0):
        labels = as_int_labels(labels)
        classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        if (counts < 2).any():
            raise ConfigError(
                f"N-pair batches need 2 distinct images per class; {int((counts < 2).sum())} classes have one "
                f"(e.g. {classes[counts < 2][:5].tolist()}). Remove them from the training split"
            )
        if not 2 <= num_pairs <= classes.size:
            raise ConfigError(f"num_pairs must be in [2, {classes.size}] (the number of classes), got {num_pairs}")
        self.num_pairs, self.seed, self.epoch = num_pairs, seed, 0
        order = np.argsort(inverse, kind="stable")
        self._members = np.split(order, np.cumsum(counts)[:-1])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """Batches per epoch: number of images // batch size (classes are visited equally often)."""
        return max(1, sum(len(m) for m in self._members) // (2 * self.num_pairs))

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        queues = [list(rng.permutation(m)) for m in self._members]
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
