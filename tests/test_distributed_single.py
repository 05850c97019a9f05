"""deepmetric.distributed in one process: every collective is the identity (multi-process: tests/training)."""

import numpy as np
import torch
from torch import nn

from deepmetric import distributed
from deepmetric.data.features import FeaturesDataset
from deepmetric.inference import embed


def test_collectives_are_identities_without_a_process_group():
    assert not distributed.is_enabled() and distributed.rank() == 0 and distributed.world_size() == 1
    x = torch.randn(5, 3, requires_grad=True)
    assert distributed.all_gather_with_grad(x) is x  # gradients untouched, not scaled
    assert distributed.all_gather(x) is x and distributed.all_gather_rows(x) is x
    np.testing.assert_array_equal(distributed.shard(7), np.arange(7))
    assert distributed.broadcast_object({"a": 1}) == {"a": 1} and distributed.all_gather_object(3) == [3]
    p = nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 3.0)
    distributed.average_gradients([p])
    assert p.grad.tolist() == [3.0, 3.0]


def test_sharded_embedding_in_one_process_is_embed():
    data = FeaturesDataset(np.random.default_rng(0).normal(size=(9, 4)), np.arange(9) % 3)
    model = nn.Linear(4, 2)
    got, labels = distributed.embed_sharded(model, data, batch_size=4, device=torch.device("cpu"))
    want, _ = embed(model, data, batch_size=4)
    assert torch.equal(got, want) and labels.tolist() == (np.arange(9) % 3).tolist()
