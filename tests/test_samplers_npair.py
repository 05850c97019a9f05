"""N-pair batches (Sohn 2016): N distinct classes × 2 distinct images, seeded, covering the data; the `npair`
sampler from a config and inside the trainer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deepmetric import samplers
from deepmetric.errors import ConfigError
from deepmetric.losses.pair import npair_indices
from deepmetric.samplers import NPairSampler
from deepmetric.training import Trainer, load
from deepmetric.training.runfolder import read_records


def test_batches_are_valid_npair_batches():
    labels = np.repeat(np.arange(10), [2, 3, 4, 5, 2, 6, 3, 2, 7, 4])
    s = NPairSampler(labels, batch_size=8, seed=1)
    seen = []
    for batch in s:
        y = labels[batch]
        assert len(batch) == 8 and len(set(y.tolist())) == 4
        assert (y[0::2] == y[1::2]).all() and all(a != p for a, p in zip(batch[0::2], batch[1::2]))
        a, p = npair_indices(torch.as_tensor(y))  # the loss accepts it (strict)
        assert len(a) == 4
        seen.extend(batch)
    assert len(s) == len(labels) // 8 and len(seen) == len(s) * 8
    per_class = np.bincount(labels[seen], minlength=10) // 2  # classes are visited in turn
    assert per_class.max() - per_class.min() <= 1


def test_seeded_and_epoch_and_pass_dependent():
    labels = np.repeat(np.arange(6), 4)
    a, b = NPairSampler(labels, 6, seed=0), NPairSampler(labels, 6, seed=0)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)
    a.set_epoch(1, pass_=1)
    assert list(a) != list(b)


def test_rejects_singletons_and_bad_sizes():
    with pytest.raises(ConfigError, match="2 distinct"):
        NPairSampler([0, 0, 1], batch_size=4)
    with pytest.raises(ConfigError, match=r"batch_size must be in \[4, 4\]"):
        NPairSampler([0, 0, 1, 1], batch_size=6)
    with pytest.raises(ConfigError, match="must be even"):
        NPairSampler([0, 0, 1, 1], batch_size=3)


def test_config_builds_it_with_two_per_class():
    labels = np.repeat(np.arange(8), 3)
    assert "npair" in samplers.SAMPLERS.available()
    config = load(None, ["sampler.name=npair", "sampler.batch_size=10"])
    assert config.sampler.m == 2  # the m_per_class default (16) does not apply
    s = samplers.from_config(config, labels)
    assert isinstance(s, NPairSampler) and s.num_pairs == 5 and s.seed == config.seed
    for batch in s:
        assert np.bincount(labels[batch]).max() == 2 and len(batch) == 10


@pytest.mark.parametrize("overrides,match", [
    (["sampler.batch_size=11"], "batch_size must be even, got 11"),
    (["sampler.m=4"], "exactly 2 images per class; remove sampler.m"),
    (["sampler.num_pairs=4"], "no parameter 'num_pairs'"),
])
def test_bad_configs_are_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        Trainer(load(None, ["sampler.name=npair"] + overrides), "unused", progress=False)


def test_training_run_with_the_npair_loss(tmp_path, fast_overrides):
    config = load(None, fast_overrides + ["sampler.name=npair", "sampler.batch_size=10", "loss.name=npair"])
    trainer = Trainer(config, tmp_path / "run", progress=False)
    for epoch in (1, 2):  # the trainer's own loader: 5 classes x 2, anchor and positive next to each other
        trainer.sampler.set_epoch(epoch)
        for _, y, ids in trainer.loader:
            assert len(ids.unique()) == 10 and (y[0::2] == y[1::2]).all() and len(y.unique()) == 5
    summary = trainer.fit()  # the loss is strict: a batch that is not N x 2 would raise
    losses = [r["train/loss"] for r in read_records(tmp_path / "run") if "train/loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses)
    assert 0 <= summary["test"]["recall@1"] <= 1
