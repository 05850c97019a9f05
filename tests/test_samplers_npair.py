"""N-pair batches: N distinct classes × 2 distinct images, seeded, covering the data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepmetric.errors import ConfigError
from deepmetric.losses.pair import npair_indices
from deepmetric.samplers_npair import NPairSampler


def test_batches_are_valid_npair_batches():
    labels = np.repeat(np.arange(10), [2, 3, 4, 5, 2, 6, 3, 2, 7, 4])
    s = NPairSampler(labels, num_pairs=4, seed=1)
    seen = []
    for batch in s:
        y = labels[batch]
        assert len(batch) == 8 and len(set(y.tolist())) == 4
        assert (y[0::2] == y[1::2]).all() and all(a != p for a, p in zip(batch[0::2], batch[1::2]))
        a, p = npair_indices(torch.as_tensor(y))  # the loss accepts it (strict)
        assert len(a) == 4
        seen.extend(batch)
    assert len(seen) == len(s) * 8
    per_class = np.bincount(labels[seen], minlength=10) // 2  # classes are visited in turn
    assert per_class.max() - per_class.min() <= 1


def test_seeded_and_epoch_dependent():
    labels = np.repeat(np.arange(6), 4)
    a, b = NPairSampler(labels, 3, seed=0), NPairSampler(labels, 3, seed=0)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)


def test_rejects_singletons_and_bad_sizes():
    with pytest.raises(ConfigError, match="2 distinct"):
        NPairSampler([0, 0, 1], num_pairs=2)
    with pytest.raises(ConfigError, match="num_pairs"):
        NPairSampler([0, 0, 1, 1], num_pairs=3)
