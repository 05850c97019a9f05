from collections import Counter

import numpy as np
import pytest

from deepmetric.errors import ConfigError, LabelError
from deepmetric.samplers import MPerClassSampler


def _labels(sizes):
    return np.repeat(np.arange(len(sizes)), sizes)


def test_every_batch_has_p_distinct_classes_times_m():
    labels = _labels([20, 13, 7, 40, 9, 11])
    sampler = MPerClassSampler(labels, m=4, batch_size=12, seed=0)
    for batch in sampler:
        assert len(batch) == 12
        counts = Counter(labels[batch].tolist())
        assert len(counts) == 3 and set(counts.values()) == {4}


def test_seeded_and_epoch_dependent():
    labels = _labels([10] * 8)
    a, b = MPerClassSampler(labels, 2, 8, seed=3), MPerClassSampler(labels, 2, 8, seed=3)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)
    a.set_epoch(1)
    assert list(a) == list(b)
    assert list(MPerClassSampler(labels, 2, 8, seed=4)) != list(MPerClassSampler(labels, 2, 8, seed=3))


@pytest.mark.parametrize("sizes", [[8] * 10, [50, 50, 3, 1, 100, 7, 8, 9, 10, 11], [5, 6, 7, 400]])
def test_one_epoch_covers_every_sample(sizes):
    labels = _labels(sizes)
    sampler = MPerClassSampler(labels, m=4, batch_size=16, seed=1)
    seen = Counter(i for batch in sampler for i in batch)
    assert set(seen) == set(range(len(labels)))  # nothing missed
    if len(set(sizes)) == 1:  # balanced, divisible: exactly once
        assert set(seen.values()) == {1}


def test_singleton_class_is_drawn_with_replacement():
    labels = _labels([1, 8, 8, 8])
    batches = list(MPerClassSampler(labels, m=4, batch_size=8, seed=0))
    with_singleton = [b for b in batches if 0 in b]
    assert with_singleton and all(b.count(0) == 4 for b in with_singleton)


def test_errors():
    labels = _labels([4] * 3)
    with pytest.raises(ConfigError, match="multiple of m"):
        MPerClassSampler(labels, m=4, batch_size=10)
    with pytest.raises(ConfigError, match="only 3"):
        MPerClassSampler(labels, m=2, batch_size=8)
    with pytest.raises(ConfigError, match="at least 2 classes"):
        MPerClassSampler(labels, m=4, batch_size=4)
    with pytest.raises(LabelError, match="integer"):
        MPerClassSampler(np.array([0.5, 1.5, 2.5, 3.5]), m=1, batch_size=2)
