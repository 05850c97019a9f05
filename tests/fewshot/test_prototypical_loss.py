"""The prototypical-network loss (Snell et al. 2017) on a batch treated as an episode."""

import math

import pytest
import torch

from deepmetric import losses
from deepmetric.errors import ConfigError, InputError
from deepmetric.losses.prototypical import PrototypicalLoss


def test_hand_computed_one_shot_episode():
    # class 0: support 0, query 1; class 1: support 3, query 2 (support = first item of a class in batch order)
    x = torch.tensor([[0.0], [3.0], [1.0], [2.0]])
    y = torch.tensor([0, 1, 0, 1])
    # query 1 (class 0): d = (1, 4); query 2 (class 1): d = (4, 1)  ->  -log softmax = log(1 + e^-3) each
    assert PrototypicalLoss(support=1)(x, y).item() == pytest.approx(math.log1p(math.exp(-3)))
    # swapping the order inside a class swaps support and query: prototypes 1 and 2, queries 0 and 3
    x2 = torch.tensor([[1.0], [2.0], [0.0], [3.0]])
    expected = math.log1p(math.exp(1 - 4))  # query 0: d = (1, 4); query 3: d = (4, 1)
    assert PrototypicalLoss(support=1)(x2, y).item() == pytest.approx(expected)


def test_prototype_is_the_support_mean_and_the_loss_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(18, 5, generator=g, dtype=torch.float64), torch.arange(18) % 3
    loss = PrototypicalLoss(support=2)(x, y)
    protos = torch.stack([x[y == c][:2].mean(0) for c in range(3)])
    total, count = 0.0, 0
    for c in range(3):
        for q in x[y == c][2:]:
            logits = -((q - protos) ** 2).sum(1)
            total += -torch.log_softmax(logits, 0)[c]
            count += 1
    assert loss.item() == pytest.approx((total / count).item(), rel=1e-10)


def test_fraction_support_and_unusable_classes():
    y = torch.tensor([0, 0, 0, 0, 1, 1, 2])  # class 2 has a single item: left out
    loss = PrototypicalLoss(support=0.75)
    _, support, query, usable = loss.split(y)
    assert support.tolist() == [True, True, True, False, True, False, False]  # floor(0.75*4)=3, floor(1.5)=1
    assert query.tolist() == [False, False, False, True, False, True, False]
    assert usable.tolist() == [True, True, False]
    with pytest.raises(InputError, match="at least 3 items"):
        PrototypicalLoss(support=2)(torch.randn(4, 2), torch.tensor([0, 0, 1, 1]))


def test_gradcheck_and_half_precision():
    x = torch.randn(12, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2] * 4)
    assert torch.autograd.gradcheck(lambda e: PrototypicalLoss(support=2)(e, y), (x,))
    half = PrototypicalLoss(support=2)(x.detach().half(), y)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(PrototypicalLoss(support=2)(x.detach(), y).item(), rel=1e-2)


def test_registered_and_validated():
    assert isinstance(losses.build("prototypical", support=3), PrototypicalLoss)
    for bad in (0, 1.0, -0.5, True, "3"):
        with pytest.raises(ConfigError):
            PrototypicalLoss(support=bad)
    with pytest.raises(ConfigError, match="miner"):
        PrototypicalLoss()(torch.randn(4, 2), torch.tensor([0, 0, 1, 1]), (torch.tensor([0]),) * 3)
