"""Shared fixtures: tiny, fast configurations of the digits pipeline."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)  # tests run two workers on two cores


FAST = ["train.epochs=2", "eval.tsne=false", "train.iterations_per_epoch=4", "eval.ks=[1,2]"]


@pytest.fixture
def fast_overrides() -> list[str]:
    """Overrides that make a digits run take about a second."""
    return list(FAST)
