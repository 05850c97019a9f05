"""Tests of the proxy- and classifier-based losses (deepmetric.losses.proxy)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from deepmetric import losses
from deepmetric.errors import ConfigError, InputError, LabelError

C, D = 5, 8

# case id -> (registry key, keywords besides num_classes / embedding_size)
CASES = {
    "proxy_anchor": ("proxy_anchor", {}),
}


def build(case: str, num_classes: int = C, embedding_size: int = D, **kw) -> torch.nn.Module:
    name, kwargs = CASES[case]
    torch.manual_seed(0)
    return losses.build(name, num_classes=num_classes, embedding_size=embedding_size, **{**kwargs, **kw})


def batch(n: int = 12, seed: int = 1, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4  # classes 0..3 present, class 4 absent
    x = torch.randn(n, D, generator=g, dtype=dtype)
    return x, labels


def with_proxies(loss: torch.nn.Module, proxies: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return functional_call(loss, {"proxies": proxies}, (x, y))


# ----------------------------------------------------------------------------------------- every loss


def test_registered():
    assert {name for name, _ in CASES.values()} <= set(losses.available())


@pytest.mark.parametrize("case", CASES)
def test_proxies_shape_and_attributes(case):
    loss = build(case)
    k = loss.proxies_per_class
    assert isinstance(loss.proxies, torch.nn.Parameter)
    assert loss.proxies.shape == (C * k, D)
    assert loss.num_classes == C and loss.embedding_size == D
    assert repr(loss)


@pytest.mark.parametrize("case", CASES)
def test_scalar_finite_and_gradients(case):
    loss = build(case)
    x, y = batch()
    x.requires_grad_(True)
    out = loss(x, y)
    assert out.ndim == 0 and torch.isfinite(out)
    out.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert loss.proxies.grad is not None and torch.isfinite(loss.proxies.grad).all()
    assert loss.proxies.grad.abs().sum() > 0


@pytest.mark.parametrize("case", CASES)
def test_gradcheck_float64(case):
    loss = build(case).double()
    x, y = batch(6, dtype=torch.float64)
    x.requires_grad_(True)
    p = loss.proxies.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: with_proxies(loss, b, a, y), (x, p), eps=1e-6, atol=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_proxies_move_toward_their_class(case):
    """One SGD step on the proxies alone: each present class's proxies get closer (cosine) to its mean."""
    loss = build(case)
    x, y = batch(40, seed=3)
    x = x + 3 * torch.randn(4, D, generator=torch.Generator().manual_seed(7))[y]  # separable classes
    k = loss.proxies_per_class

    def closeness() -> torch.Tensor:
        means = torch.stack([x[y == c].mean(0) for c in range(4)])
        per_proxy = F.cosine_similarity(loss.proxies.detach()[: 4 * k], means.repeat_interleave(k, 0), dim=1)
        return per_proxy.view(4, k).mean(1)

    before = closeness()
    opt = torch.optim.SGD(loss.parameters(), lr=getattr(loss, "_test_lr", 1.0))
    for _ in range(3):
        opt.zero_grad()
        loss(x, y).backward()
        opt.step()
    after = closeness()
    assert (after > before).all(), (before, after)


@pytest.mark.parametrize("case", CASES)
def test_half_matches_float32(case):
    loss = build(case)
    x, y = batch()
    half = x.half()
    out = loss(half, y)
    assert out.dtype == torch.float32
    assert torch.allclose(out, loss(half.float(), y), rtol=1e-5, atol=1e-5)
    assert torch.allclose(out, loss(x, y), rtol=2e-2, atol=2e-2)
    bf = loss(x.bfloat16(), y)
    assert torch.isfinite(bf)


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_a_clear_error(case):
    loss = build(case)
    x, y = batch()
    with pytest.raises(LabelError, match="labels must lie in"):
        loss(x, torch.full_like(y, C))
    with pytest.raises(LabelError):
        loss(x, -1 - y)
    with pytest.raises(InputError, match="embedding_size"):
        loss(torch.randn(4, D + 1), y[:4])
    with pytest.raises(LabelError):
        loss(x, y[:-1])
    with pytest.raises(LabelError):
        loss(x, y.float())
    with pytest.raises(InputError):
        loss(x.clone().fill_(float("nan")), y)
    with pytest.raises(ConfigError, match="miner"):
        loss(x, y, (torch.tensor([0]), torch.tensor([4]), torch.tensor([1])))
    with pytest.raises(ConfigError):
        losses.build(CASES[case][0], num_classes=0, embedding_size=D)


@pytest.mark.parametrize("case", CASES)
def test_single_sample_batch(case):
    loss = build(case)
    out = loss(torch.randn(1, D), torch.tensor([2]))
    assert torch.isfinite(out)


@pytest.mark.parametrize("case", CASES)
def test_trainer_fills_num_classes_and_embedding_size(case):
    from deepmetric.losses import LOSSES

    params = LOSSES.parameters(CASES[case][0])
    assert "num_classes" in params and "embedding_size" in params


# ---------------------------------------------------------------------------------------- Proxy-Anchor


def unit_case(loss: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Proxies e0, e1 (C = 2, D = 2); returns one embedding e0 of class 0."""
    with torch.no_grad():
        loss.proxies.copy_(torch.eye(2) * 3.0)  # scale is irrelevant: cosine
    return torch.tensor([[2.0, 0.0]]), torch.tensor([0])


def test_proxy_anchor_by_hand():
    loss = losses.build("proxy_anchor", num_classes=2, embedding_size=2)
    assert (loss.alpha, loss.delta) == (32.0, 0.1)
    x, y = unit_case(loss)
    expected = math.log(1 + math.exp(-32 * 0.9)) + 0.5 * (math.log(1) + math.log(1 + math.exp(3.2)))
    assert loss(x, y).item() == pytest.approx(expected, rel=1e-6)


def test_proxy_anchor_proxies_without_positives_add_nothing_to_the_first_term():
    loss = losses.build("proxy_anchor", num_classes=3, embedding_size=2, delta=0.0)
    with torch.no_grad():
        loss.proxies.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    x, y = torch.tensor([[1.0, 0.0], [0.6, 0.8]]), torch.tensor([0, 0])
    a = 32.0
    pos = math.log(1 + math.exp(-a * 1.0) + math.exp(-a * 0.6))  # only proxy 0 has positives: |P+| = 1
    neg = (math.log(1) + math.log(1 + math.exp(0) + math.exp(a * 0.8)) + math.log(1 + math.exp(-a) + math.exp(-a * 0.6))) / 3
    assert loss(x, y).item() == pytest.approx(pos + neg, rel=1e-6)


def test_proxy_anchor_couples_samples_of_a_class():
    """∂L/∂x_i depends on the other same-class x_j: non-zero Hessian cross block."""
    loss = build("proxy_anchor").double()
    x = torch.randn(3, D, dtype=torch.float64)
    y = torch.tensor([1, 1, 2])
    hess = torch.autograd.functional.hessian(lambda e: loss(e, y), x)  # [3, D, 3, D]
    assert hess[0, :, 1, :].abs().max() > 1e-8


def test_proxy_anchor_limits():
    """α → ∞ with the positive inside the margin and the negative proxy beyond −δ: L → 0; α → 0: log 2 terms."""
    x, y = torch.tensor([[2.0, 0.0]]), torch.tensor([0])
    opposite = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    loss = losses.build("proxy_anchor", num_classes=2, embedding_size=2, alpha=1000.0)
    with torch.no_grad():
        loss.proxies.copy_(opposite)
    assert loss(x, y).item() < 1e-6
    small = losses.build("proxy_anchor", num_classes=2, embedding_size=2, alpha=1e-6)
    with torch.no_grad():
        small.proxies.copy_(opposite)
    assert small(x, y).item() == pytest.approx(math.log(2) + 0.5 * (0 + math.log(2)), rel=1e-4)


def test_proxy_anchor_matches_pml():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    ours = build("proxy_anchor")
    ref = pml.ProxyAnchorLoss(C, D, margin=0.1, alpha=32)
    with torch.no_grad():
        ref.proxies.copy_(ours.proxies)
    x, y = batch(16, seed=5)
    x = x.requires_grad_(True)
    a, b = ours(x, y), ref(x, y)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    ga = torch.autograd.grad(a, x)[0]
    gb = torch.autograd.grad(b, x)[0]
    assert torch.allclose(ga, gb, atol=1e-5)


def test_proxy_anchor_initialisation_is_kaiming_fan_out():
    loss = losses.build("proxy_anchor", num_classes=400, embedding_size=64)
    std = loss.proxies.detach().std().item()
    assert std == pytest.approx(math.sqrt(2 / 400), rel=0.05)
