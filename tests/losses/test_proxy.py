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
    "proxy_nca": ("proxy_nca", {}),
    "proxy_nca_pp": ("proxy_nca_pp", {}),
    "proxy_nca_pp_smoothed": ("proxy_nca_pp", {"epsilon": 0.1}),
    "normalized_softmax": ("normalized_softmax", {}),
    "arcface": ("arcface", {}),
    "cosface": ("cosface", {}),
    "soft_triple": ("soft_triple", {"proxies_per_class": 3}),
    "cross_entropy": ("cross_entropy", {"dropout": 0.0}),  # dropout off: deterministic comparisons
    "multi_proxy_anchor": ("multi_proxy_anchor", {}),
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
    keys = {"proxy_anchor", "proxy_nca", "proxy_nca_pp", "normalized_softmax", "arcface", "cosface",
            "soft_triple", "cross_entropy", "multi_proxy_anchor"}
    assert {name for name, _ in CASES.values()} == keys
    assert keys <= set(losses.available())


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
    zero_init = bool((loss.proxies == 0).all())  # cross_entropy: W = 0, so ∂L/∂x = 0 at the first step
    out.backward()
    assert torch.isfinite(x.grad).all() and (zero_init or x.grad.abs().sum() > 0)
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
    """Small gradient steps on the proxies alone: each present class's proxies get closer (cosine) to its
    mean, relative to the other classes' means (a proxy is also pushed away from the other classes, so
    its plain cosine to its own mean may dip when it started close to them). Step = 1% of the proxies'
    mean norm for the largest row, so every loss scale is comparable."""
    loss = build(case)
    x, y = batch(40, seed=3)
    x = 0.5 * x + 3 * torch.eye(D)[y]  # separable classes with orthogonal means
    k = loss.proxies_per_class

    def closeness() -> torch.Tensor:
        means = F.normalize(torch.stack([x[y == c].mean(0) for c in range(4)]), dim=1)
        cos = F.normalize(loss.proxies.detach()[: 4 * k], dim=1) @ means.T  # [4K, 4]
        own = cos.view(4, k, 4)[torch.arange(4), :, torch.arange(4)]  # [4, K]
        others = (cos.view(4, k, 4).sum(2) - own) / 3
        return (own - others).mean(1)

    before = closeness()
    for _ in range(3):
        loss.zero_grad()
        loss(x, y).backward()
        g = loss.proxies.grad
        scale = 0.01 * loss.proxies.detach().norm(dim=1).mean().clamp(min=1.0 if case == "cross_entropy" else 0) / g.norm(dim=1).max()
        with torch.no_grad():
            loss.proxies -= scale * g
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


def set_proxies(loss: torch.nn.Module, proxies) -> torch.nn.Module:
    with torch.no_grad():
        loss.proxies.copy_(torch.as_tensor(proxies, dtype=loss.proxies.dtype))
    return loss


def cos_to(loss: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=1) @ F.normalize(loss.proxies.detach(), dim=1).T


# ------------------------------------------------------------------------------- Proxy-NCA, ProxyNCA++


def test_proxy_nca_two_classes_is_d_pos_minus_d_neg_and_can_be_negative():
    loss = set_proxies(losses.build("proxy_nca", num_classes=2, embedding_size=2), [[1.0, 0.0], [0.0, 1.0]])
    x, y = torch.tensor([[3.0, 0.0], [0.6, 0.8]]), torch.tensor([0, 1])
    # sample 0: d_pos = 0, d_neg = 2; sample 1: d_pos = ‖(0.6, −0.2)‖² = 0.4, d_neg = ‖(−0.4, 0.8)‖² = 0.8
    assert loss(x, y).item() == pytest.approx(((0 - 2) + (0.4 - 0.8)) / 2, abs=1e-6)
    assert loss(x, y).item() < 0


def test_proxy_nca_by_hand_three_classes():
    loss = set_proxies(losses.build("proxy_nca", num_classes=3, embedding_size=2), [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    x, y = torch.tensor([[1.0, 0.0]]), torch.tensor([1])
    d = [0.0, 2.0, 4.0]  # to proxies 0, 1, 2
    expected = d[1] + math.log(math.exp(-d[0]) + math.exp(-d[2]))
    assert loss(x, y).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("case", ["proxy_nca", "proxy_nca_pp", "normalized_softmax", "soft_triple", "arcface"])
def test_scaling_embeddings_changes_nothing(case):
    loss = build(case)
    x, y = batch()
    assert loss(7.5 * x, y).item() == pytest.approx(loss(x, y).item(), rel=1e-5)


def test_proxy_nca_pp_is_cross_entropy_of_18_cos():
    loss = build("proxy_nca_pp")
    assert loss.temperature == pytest.approx(1 / 9) and loss.epsilon == 0
    x, y = batch()
    expected = F.cross_entropy(18 * cos_to(loss, x), y)
    assert loss(x, y).item() == pytest.approx(expected.item(), abs=1e-6)
    assert loss(x, y).item() >= 0


def test_proxy_nca_pp_label_smoothing_is_eps_over_c_minus_1():
    loss = build("proxy_nca_pp", epsilon=0.1)
    x, y = batch()
    target = torch.full((len(y), C), 0.1 / (C - 1))
    target[torch.arange(len(y)), y] = 0.9
    assert torch.allclose(target.sum(1), torch.ones(len(y)))
    expected = -(target * F.log_softmax(18 * cos_to(loss, x), 1)).sum(1).mean()
    assert loss(x, y).item() == pytest.approx(expected.item(), rel=1e-6)
    torch_ls = F.cross_entropy(18 * cos_to(loss, x), y, label_smoothing=0.1)
    assert loss(x, y).item() != pytest.approx(torch_ls.item(), rel=1e-4)


def test_proxy_nca_pp_temperature_limits():
    x, y = batch()
    hot = build("proxy_nca_pp", temperature=1e6)
    assert hot(x, y).item() == pytest.approx(math.log(C), rel=1e-5)  # T → ∞: uniform softmax
    cold = build("proxy_nca_pp", temperature=1e-4)
    cos = cos_to(cold, x)
    margin = cos.gather(1, y[:, None]).squeeze(1) - cos.masked_fill(F.one_hot(y, C).bool(), -2).amax(1)
    expected = torch.relu(-2 * margin / 1e-4).mean()  # T → 0: hinge on the best wrong proxy
    assert cold(x, y).item() == pytest.approx(expected.item(), rel=1e-3)


def test_proxy_nca_pp_matches_pml_proxy_nca_at_temperature_1():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    ours = build("proxy_nca_pp", temperature=1.0)
    ref = pml.ProxyNCALoss(C, D, softmax_scale=1)
    with torch.no_grad():
        ref.proxies.copy_(ours.proxies)
    x, y = batch(16, seed=5)
    assert ours(x, y).item() == pytest.approx(ref(x, y).item(), rel=1e-5)


# ------------------------------------------------------------------------- normalised softmax, margins


def test_normalized_softmax_is_cross_entropy_of_cos_over_t():
    loss = build("normalized_softmax")
    assert loss.temperature == 0.05
    x, y = batch()
    assert loss(x, y).item() == pytest.approx(F.cross_entropy(cos_to(loss, x) / 0.05, y).item(), rel=1e-6)
    assert build("normalized_softmax", temperature=1e6)(x, y).item() == pytest.approx(math.log(C), rel=1e-5)


def test_normalized_softmax_matches_pml():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    ours = build("normalized_softmax")
    ref = pml.NormalizedSoftmaxLoss(C, D, temperature=0.05)
    with torch.no_grad():
        ref.W.copy_(ours.proxies.T)
    x, y = batch(16, seed=5)
    assert ours(x, y).item() == pytest.approx(ref(x, y).item(), rel=1e-5)


@pytest.mark.parametrize("name", ["arcface", "cosface"])
def test_zero_margin_is_normalized_softmax(name):
    loss = build(name, margin=0.0, scale=30.0)
    ns = set_proxies(build("normalized_softmax", temperature=1 / 30), loss.proxies.detach())
    x, y = batch()
    assert loss(x, y).item() == pytest.approx(ns(x, y).item(), rel=1e-5)


def test_margin_defaults():
    arc, cosf = build("arcface"), build("cosface")
    assert (arc.margin, arc.scale) == (0.5, 64.0)
    assert (cosf.margin, cosf.scale) == (0.35, 64.0)


def test_cosface_by_hand():
    loss = set_proxies(losses.build("cosface", num_classes=2, embedding_size=2), [[1.0, 0.0], [0.0, 1.0]])
    x, y = torch.tensor([[0.6, 0.8]]), torch.tensor([0])
    expected = -math.log(math.exp(64 * (0.6 - 0.35)) / (math.exp(64 * (0.6 - 0.35)) + math.exp(64 * 0.8)))
    assert loss(x, y).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", ["arcface", "cosface"])
def test_target_logit_decreases_in_theta(name):
    loss = build(name)
    theta = torch.linspace(0, math.pi, 2001, dtype=torch.float64)
    cos = torch.cos(theta).requires_grad_(True)
    t, slope = loss.target(cos)
    (autograd_slope,) = torch.autograd.grad(t.sum(), cos)
    assert torch.allclose(slope, autograd_slope)  # the derivative the fused cross-entropy uses
    t = t.detach()
    assert (t[1:] < t[:-1]).all()
    if name == "arcface":
        small = theta < math.pi - 0.5
        assert torch.allclose(t[small], torch.cos(theta[small] + 0.5), atol=2e-4)  # sin θ ≥ √1e-7


@pytest.mark.parametrize("name", ["arcface", "cosface"])
def test_finite_gradients_at_cos_plus_minus_one(name):
    loss = set_proxies(losses.build(name, num_classes=2, embedding_size=2), [[1.0, 0.0], [0.0, 1.0]])
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], requires_grad=True)
    out = loss(x, torch.tensor([0, 0]))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(x.grad).all() and torch.isfinite(loss.proxies.grad).all()


@pytest.mark.parametrize("name", ["arcface", "cosface"])
def test_margins_match_pml(name):
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    ours = build(name)
    ref = pml.ArcFaceLoss(C, D, margin=math.degrees(0.5), scale=64) if name == "arcface" else pml.CosFaceLoss(C, D, margin=0.35, scale=64)
    with torch.no_grad():
        ref.W.copy_(ours.proxies.T)
    x, y = batch(16, seed=5)
    assert ours(x, y).item() == pytest.approx(ref(x, y).item(), rel=1e-4)


# ------------------------------------------------------------------------------------------ SoftTriple


def test_soft_triple_defaults():
    loss = losses.build("soft_triple", num_classes=C, embedding_size=D)
    assert (loss.la, loss.gamma, loss.tau, loss.delta, loss.proxies_per_class) == (20.0, 0.1, 0.2, 0.01, 10)
    assert loss.proxies.shape == (C * 10, D)


def test_soft_triple_with_one_centre_is_cosface_with_scale_la_and_margin_delta():
    st = build("soft_triple", proxies_per_class=1)
    cf = set_proxies(build("cosface", scale=20.0, margin=0.01), st.proxies.detach())
    x, y = batch()
    assert st(x, y).item() == pytest.approx(cf(x, y).item(), rel=1e-6)


def test_soft_triple_small_gamma_uses_the_closest_centre():
    st = build("soft_triple", proxies_per_class=3, gamma=1e-5, tau=0.0)
    x, y = batch()
    best = cos_to(st, x).view(len(x), C, 3).amax(2)
    expected = F.cross_entropy(20 * (best - 0.01 * F.one_hot(y, C)), y)
    assert st(x, y).item() == pytest.approx(expected.item(), rel=1e-5)


def test_soft_triple_regularizer_by_hand():
    # orthogonal centres within each class: R = C·√(2 + 1e-5) / (C·2·1)
    ortho = losses.build("soft_triple", num_classes=3, embedding_size=6, proxies_per_class=2)
    set_proxies(ortho, torch.eye(6))
    assert ortho.regularizer().item() == pytest.approx(math.sqrt(2 + 1e-5) / 2, rel=1e-6)
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    no_reg = losses.build("soft_triple", num_classes=3, embedding_size=6, proxies_per_class=2, tau=0.0)
    set_proxies(no_reg, torch.eye(6))
    assert ortho(x, y).item() == pytest.approx(no_reg(x, y).item() + 0.2 * math.sqrt(2 + 1e-5) / 2, rel=1e-6)


def test_soft_triple_matches_pml():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    ours = build("soft_triple", proxies_per_class=3, tau=0.0)
    ref = pml.SoftTripleLoss(C, D, centers_per_class=3, la=20, gamma=0.1, margin=0.01)
    with torch.no_grad():
        ref.fc.copy_(ours.proxies.T)
    x, y = batch(16, seed=5)
    assert ours(x, y).item() == pytest.approx(ref(x, y).item(), rel=1e-5)


# --------------------------------------------------------------------------- cross-entropy (Boudiaf)


def test_cross_entropy_defaults_and_zero_init_gives_log_c():
    loss = losses.build("cross_entropy", num_classes=C, embedding_size=D)
    assert (loss.epsilon, loss.dropout) == (0.1, 0.5)
    assert (loss.proxies == 0).all() and (loss.bias == 0).all() and loss.bias.shape == (C,)
    x, y = batch()
    assert loss(x, y).item() == pytest.approx(math.log(C), rel=1e-6)


def test_cross_entropy_minimum_is_the_entropy_of_the_target():
    eps, c = 0.1, 4
    loss = losses.build("cross_entropy", num_classes=c, embedding_size=c, epsilon=eps, dropout=0.0)
    t = torch.full((c,), eps / (c - 1))
    t[0] = 1 - eps
    with torch.no_grad():  # logits = log t for the one-hot embedding e0 of class 0
        loss.proxies.zero_()
        loss.proxies[:, 0] = torch.log(t)
    entropy = -(t * t.log()).sum().item()
    at_target = loss(torch.eye(c)[:1], torch.tensor([0])).item()
    assert at_target == pytest.approx(entropy, rel=1e-6)
    with torch.no_grad():
        loss.proxies[0, 0] += 0.5  # moving away from the target raises the loss
    assert loss(torch.eye(c)[:1], torch.tensor([0])).item() > at_target


def test_cross_entropy_uses_bias_and_unnormalised_features():
    loss = build("cross_entropy")
    x, y = batch()
    with torch.no_grad():
        loss.proxies.normal_()
        loss.bias.normal_()
    logits = x @ loss.proxies.detach().T + loss.bias.detach()
    t = torch.full_like(logits, 0.1 / (C - 1)).scatter(1, y[:, None], 0.9)
    expected = -(t * F.log_softmax(logits, 1)).sum(1).mean()
    assert loss(x, y).item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss(2 * x, y).item() != pytest.approx(loss(x, y).item(), rel=1e-3)


def test_cross_entropy_dropout_only_in_training():
    loss = losses.build("cross_entropy", num_classes=C, embedding_size=D)
    with torch.no_grad():
        loss.proxies.normal_()
    x, y = batch()
    loss.eval()
    assert loss(x, y).item() == loss(x, y).item()
    loss.train()
    torch.manual_seed(0)
    a = loss(x, y).item()
    b = loss(x, y).item()
    assert a != b


# --------------------------------------------------------------------------------- Multi-Proxy Anchor


def test_multi_proxy_anchor_with_one_proxy_is_proxy_anchor():
    mpa = build("multi_proxy_anchor", proxies_per_class=1)
    pa = set_proxies(build("proxy_anchor"), mpa.proxies.detach())
    x, y = batch()
    assert mpa(x, y).item() == pytest.approx(pa(x, y).item(), rel=1e-6)


def test_multi_proxy_anchor_small_gamma_uses_the_closest_proxy():
    mpa = build("multi_proxy_anchor", gamma=1e-5)
    k = mpa.proxies_per_class
    x, y = batch()
    best = cos_to(mpa, x).view(len(x), C, k).argmax(2)  # closest proxy of each class, per sample
    # with one proxy per class placed at the closest one, only for a single sample:
    pa = build("proxy_anchor")
    set_proxies(pa, mpa.proxies.detach().view(C, k, D)[torch.arange(C), best[0]])
    assert mpa(x[:1], y[:1]).item() == pytest.approx(pa(x[:1], y[:1]).item(), rel=1e-4)


@pytest.mark.parametrize("case", ["proxy_anchor", "soft_triple", "arcface", "cross_entropy"])
def test_autocast_is_disabled_inside_the_loss(case):
    """Under mixed precision the logits and log-sum-exps stay float32 (CPU bfloat16 autocast here)."""
    loss = build(case)
    x, y = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(x, y)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(loss(x, y).item(), rel=1e-6)


def test_cross_batch_memory_is_refused():
    loss = build("proxy_anchor")
    x, y = batch()
    with pytest.raises(ConfigError, match="memory"):
        loss(x, y, ref_embeddings=x, ref_labels=y)


# ------------------------------------------------------------------------ hand-differentiated kernels


def kernel_cases():
    from deepmetric.losses import proxy as P

    arc = build("arcface")
    return {
        "cosine": (P.cosine_to_proxies, P._reference_cosine, "xw"),
        "proxy_anchor": (lambda s, y: P.proxy_anchor_terms(s, y, 32.0, 0.1),
                         lambda s, y: P._reference_proxy_anchor(s, y, 32.0, 0.1), "sy"),
        "softmax_ce": (lambda s, y: P.softmax_cross_entropy(s, y, 20.0),
                       lambda s, y: P._reference_softmax_ce(s, y, 20.0, None), "sy"),
        "softmax_ce_arcface": (lambda s, y: P.softmax_cross_entropy(s, y, 64.0, arc.target),
                               lambda s, y: P._reference_softmax_ce(s, y, 64.0, arc.target), "sy"),
        "cosine_softmax_ce": (lambda x, w: P.cosine_softmax_cross_entropy(x, w, KERNEL_LABELS, 20.0),
                              lambda x, w: P._reference_softmax_ce(P._reference_cosine(x, w), KERNEL_LABELS, 20.0, None),
                              "xw"),
        "cosine_softmax_ce_arcface": (
            lambda x, w: P.cosine_softmax_cross_entropy(x, w, KERNEL_LABELS, 64.0, arc.target),
            lambda x, w: P._reference_softmax_ce(P._reference_cosine(x, w), KERNEL_LABELS, 64.0, arc.target), "xw"),
        "relaxed": (lambda s, y: P.relaxed_class_similarity(s, 3, 0.1),
                    lambda s, y: P._reference_relaxed(s, 3, 0.1), "sy"),
    }


KERNEL_LABELS = torch.tensor([0, 2, 2, 5, 0, 1])


@pytest.mark.parametrize("case", ["cosine", "proxy_anchor", "softmax_ce", "softmax_ce_arcface", "cosine_softmax_ce",
                                  "cosine_softmax_ce_arcface", "relaxed"])
def test_fused_kernels_equal_their_autograd_references(case):
    """Values, gradients and (through the differentiable fallback) second derivatives of each
    hand-differentiated kernel equal the plain autograd composition; labels with repeats, absent classes."""
    fused, reference, kind = kernel_cases()[case]
    g = torch.Generator().manual_seed(0)
    y = KERNEL_LABELS
    if kind == "xw":
        inputs = (torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(9, 4, generator=g, dtype=torch.float64))
        f, r = fused, reference
    else:
        inputs = (torch.rand(6, 9, generator=g, dtype=torch.float64) * 2 - 1,)
        f, r = (lambda s: fused(s, y)), (lambda s: reference(s, y))
    inputs = tuple(t.requires_grad_(True) for t in inputs)
    a, b = f(*inputs), r(*inputs)
    assert torch.allclose(a, b, atol=1e-12)
    up = torch.randn(a.shape, generator=g, dtype=torch.float64)
    ga = torch.autograd.grad(a, inputs, up, create_graph=False)
    gb = torch.autograd.grad(b, inputs, up)
    assert all(torch.allclose(u, v, atol=1e-10) for u, v in zip(ga, gb))
    ha = torch.autograd.functional.hessian(lambda t: (f(t, *inputs[1:]) * up).sum(), inputs[0])
    hb = torch.autograd.functional.hessian(lambda t: (r(t, *inputs[1:]) * up).sum(), inputs[0])
    assert torch.allclose(ha, hb, atol=1e-9) and ha.abs().max() > 0
