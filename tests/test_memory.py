"""Cross-batch memory: FIFO order, wrap-around, state_dict round trip, use as loss references."""

from __future__ import annotations

import pytest
import torch

from deepmetric import losses
from deepmetric.errors import ConfigError, InputError
from deepmetric.memory import CrossBatchMemory


def test_fifo_and_wraparound():
    mem = CrossBatchMemory(size=5, embedding_size=2)
    assert len(mem) == 0
    for start in (0, 3, 6):  # batches of 3: 0..2, 3..5, 6..8 -> keeps the last 5: 4..8
        x = torch.arange(start, start + 3, dtype=torch.float32)[:, None].repeat(1, 2)
        mem.enqueue(x, torch.arange(start, start + 3))
    emb, lab = mem.get()
    assert len(mem) == 5 and sorted(lab.tolist()) == [4, 5, 6, 7, 8]
    torch.testing.assert_close(emb[:, 0], lab.float())


def test_batch_larger_than_memory_keeps_newest():
    mem = CrossBatchMemory(size=3, embedding_size=1)
    mem.enqueue(torch.arange(7.0)[:, None], torch.arange(7))
    assert sorted(mem.get()[1].tolist()) == [4, 5, 6]


def test_detached_half_input_and_state_dict_roundtrip():
    mem = CrossBatchMemory(size=4, embedding_size=3)
    x = torch.randn(2, 3, requires_grad=True)
    mem.enqueue(x.half(), torch.tensor([1, 2]))
    emb, _ = mem.get()
    assert not emb.requires_grad and emb.dtype == torch.float32
    other = CrossBatchMemory(size=4, embedding_size=3)
    other.load_state_dict(mem.state_dict())
    assert len(other) == 2 and int(other.ptr) == 2
    torch.testing.assert_close(other.get()[0], emb)
    other.reset()
    assert len(other) == 0


def test_bad_input():
    with pytest.raises(ConfigError):
        CrossBatchMemory(size=0, embedding_size=3)
    mem = CrossBatchMemory(size=4, embedding_size=3)
    with pytest.raises(InputError, match="dimension"):
        mem.enqueue(torch.randn(2, 5), torch.tensor([0, 1]))
    with pytest.raises(InputError):
        mem.enqueue(torch.full((2, 3), float("nan")), torch.tensor([0, 1]))


@pytest.mark.parametrize("name", ["contrastive", "triplet", "margin", "multi_similarity", "circle", "supcon", "ntxent", "npair"])
def test_memory_feeds_every_loss(name):
    torch.manual_seed(0)
    mem = CrossBatchMemory(size=32, embedding_size=8)
    loss = losses.build(name)
    for step in range(3):
        x = torch.randn(8, 8, requires_grad=True)
        y = torch.arange(4).repeat_interleave(2) + 2 * step
        out = loss(x, y)
        if len(mem):
            out = out + loss(x, y, ref_embeddings=mem.get()[0], ref_labels=mem.get()[1])
        out.backward()
        assert torch.isfinite(x.grad).all()
        mem.enqueue(x, y)
    with pytest.raises(InputError, match="empty"):
        loss(x, y, ref_embeddings=torch.zeros(0, 8), ref_labels=torch.zeros(0, dtype=torch.long))
