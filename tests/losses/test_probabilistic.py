"""Tests of the non-isotropic probabilistic proxies (deepmetric.losses.probabilistic)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from deepmetric import losses
from deepmetric.errors import ConfigError, InputError, LabelError
from deepmetric.losses.probabilistic import (
    DISTANCES,
    log_bessel_iv,
    log_vmf_normalizer,
    mean_resultant_length,
    nivmf_log_density,
    sample_vmf,
)

C, D = 5, 8


def build(distance: str = "el_nivmf", num_classes: int = C, embedding_size: int = D, **kw) -> torch.nn.Module:
    """The loss without the Proxy-Anchor guidance term unless ``guidance`` is given."""
    torch.manual_seed(0)
    return losses.build("nivmf", num_classes=num_classes, embedding_size=embedding_size, distance=distance,
                        **{"guidance": 0.0, **kw})


def batch(n: int = 12, seed: int = 1, dtype=torch.float32, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, D, generator=g, dtype=dtype), torch.arange(n) % 4


def unit(v) -> torch.Tensor:
    return F.normalize(torch.as_tensor(v, dtype=torch.float64), dim=-1)


# ------------------------------------------------------------------------------ Bessel and normaliser


@pytest.mark.parametrize("dim", [2, 3, 8, 128, 512])
def test_log_bessel_matches_scipy(dim):
    special = pytest.importorskip("scipy.special")
    nu = dim / 2 - 1
    kappa = np.logspace(-1, 3, 41)
    ive, ive1 = special.ive(nu, kappa), special.ive(nu + 1, kappa)
    ok = ive > 1e-250  # scipy underflows for large orders and small arguments
    log_i, ratio = log_bessel_iv(nu, torch.as_tensor(kappa))
    assert np.abs(log_i.numpy()[ok] - (np.log(ive[ok]) + kappa[ok])).max() < 1e-7
    assert np.abs(ratio.numpy()[ok] - ive1[ok] / ive[ok]).max() < 1e-8
    assert torch.isfinite(log_i).all()  # also where scipy underflows


def test_log_normalizer_closed_forms():
    k = torch.tensor([0.1, 1.0, 7.0, 300.0], dtype=torch.float64)
    c3 = torch.log(k / (4 * math.pi * torch.sinh(k)))  # D = 3: C_3(κ) = κ / (4π sinh κ)
    assert torch.allclose(log_vmf_normalizer(k[:3], 3), c3[:3], atol=1e-9)
    assert log_vmf_normalizer(k[3:], 3).item() == pytest.approx(math.log(300 / (2 * math.pi)) - 300, abs=1e-9)
    area = math.log(2) + 64 * math.log(math.pi) - math.lgamma(64)  # κ → 0: uniform, 1 / |S^127|
    assert log_vmf_normalizer(torch.tensor([1e-6], dtype=torch.float64), 128).item() == pytest.approx(-area, abs=1e-6)
    official = log_vmf_normalizer(k, 128, "official")
    assert torch.allclose(official, 127 - 0.01909 * k - 0.003355 * k**2)
    assert torch.allclose(log_vmf_normalizer(k, 512, "official"), 868 - 0.0002662 * k - 0.0009685 * k**2)


def test_log_normalizer_gradient_is_minus_mean_resultant_length():
    """d log C_D(κ)/dκ = −A_D(κ) (the vMF is an exponential family)."""
    k = torch.tensor([0.5, 3.0, 40.0], dtype=torch.float64, requires_grad=True)
    for dim in (3, 64):
        (g,) = torch.autograd.grad(log_vmf_normalizer(k, dim).sum(), k)
        assert torch.allclose(g, -mean_resultant_length(k.detach(), dim), atol=1e-8)


# ------------------------------------------------------------------------------------------- sampler


@pytest.mark.parametrize("dim,kappa", [(3, 2.0), (16, 10.0), (128, 200.0)])
def test_sampler_mean_resultant_length(dim, kappa):
    torch.manual_seed(0)
    mu = unit(torch.randn(2, dim, dtype=torch.float64))
    z = sample_vmf(mu, torch.full((2,), kappa, dtype=torch.float64), 4000)  # [S, 2, D]
    assert torch.allclose(z.norm(dim=-1), torch.ones((), dtype=torch.float64), atol=1e-12)
    w = (z * mu).sum(-1)  # μᵀz
    se = w.std() / math.sqrt(w.numel())
    assert abs(w.mean().item() - mean_resultant_length(torch.tensor(kappa, dtype=torch.float64), dim).item()) < 4 * se
    # the mean direction is μ: the component orthogonal to μ averages out
    ortho = z.mean(0) - w.mean(0)[:, None] * mu
    assert ortho.norm(dim=-1).max() < 0.05


def test_sampler_reaches_mu_and_kappa_and_collapses_for_large_kappa():
    mu = unit([[1.0, 2.0, -1.0, 0.5]]).requires_grad_(True)
    kappa = torch.tensor([5.0], dtype=torch.float64, requires_grad=True)
    torch.manual_seed(0)
    z = sample_vmf(mu, kappa, 64)
    (z[..., 1].sum()).backward()
    assert mu.grad.abs().sum() > 0 and kappa.grad.abs().sum() > 0
    z = sample_vmf(mu.detach(), torch.tensor([1e7], dtype=torch.float64), 16)
    assert torch.allclose(z, mu.detach().expand_as(z), atol=2e-3)


# ------------------------------------------------------------------------------------- nivMF density


def test_nivmf_with_isotropic_concentration_is_the_vmf():
    torch.manual_seed(0)
    z, mu = unit(torch.randn(6, D, dtype=torch.float64)), unit(torch.randn(3, D, dtype=torch.float64))
    k = torch.tensor([0.5, 4.0, 30.0], dtype=torch.float64)
    log_f = nivmf_log_density(z, mu, k[:, None].expand(3, D))
    assert torch.allclose(log_f, log_vmf_normalizer(k, D)[None] + k[None] * (z @ mu.T), atol=1e-9)


def test_nivmf_density_integrates_to_one_on_the_circle():
    theta = torch.arange(20000, dtype=torch.float64) * (2 * math.pi / 20000)
    z = torch.stack([theta.cos(), theta.sin()], 1)
    mu = unit([[0.6, 0.8], [-1.0, 0.3]])
    kappa = torch.tensor([[5.0, 0.7], [0.3, 9.0]], dtype=torch.float64)
    mass = nivmf_log_density(z, mu, kappa).exp().sum(0) * (2 * math.pi / 20000)
    assert torch.allclose(mass, torch.ones(2, dtype=torch.float64), atol=1e-9)


def test_nivmf_by_hand_in_two_dimensions():
    """μ = e₁ / e₂, K = diag(2, 1), z = e₁: hand-computed from the formula (I_0(2), I_0(1) from tables)."""
    z = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    mu = torch.eye(2, dtype=torch.float64)
    kappa = torch.tensor([[2.0, 1.0], [2.0, 1.0]], dtype=torch.float64)
    i0_2, i0_1 = 2.2795853023360673, 1.2660658777520082
    # class 0: Kμ = (2, 0), Kz = (2, 0): log C_2(2) + 2 + log 2 − 2 log 2
    f0 = -math.log(2 * math.pi * i0_2) + 2 + math.log(2) - 2 * math.log(2)
    # class 1: Kμ = (0, 1), cos(Kz, Kμ) = 0: log C_2(1) + 0 + log 2 − 2 log 2
    f1 = -math.log(2 * math.pi * i0_1) + math.log(2) - 2 * math.log(2)
    log_f = nivmf_log_density(z, mu, kappa)
    assert log_f[0].tolist() == pytest.approx([f0, f1], abs=1e-8)
    loss = build("nivmf", num_classes=2, embedding_size=2, temperature=1.0, learn_temperature=False)
    with torch.no_grad():
        loss.proxies.copy_(torch.eye(2))
        loss.kappa.copy_(kappa)
    expected = -f0 + math.log(math.exp(f0) + math.exp(f1))
    assert loss(torch.tensor([[3.0, 0.0], [0.5, 0.0]]), torch.tensor([0, 0])).item() == pytest.approx(expected, rel=1e-6)


def test_official_variant_reproduces_the_reference_formula():
    """Reference (``proxynca_nivmf.log_sim``): log C(‖Kμ‖) + ‖Kμ‖cos(Kz, Kμ) + Σ log κ − log‖Kμ‖ with the
    fitted normaliser; its expected likelihood uses z instead of Kz."""
    torch.manual_seed(0)
    dim = 128
    z, mu = unit(torch.randn(4, dim, dtype=torch.float64)), unit(torch.randn(3, dim, dtype=torch.float64))
    kappa = torch.rand(3, dim, dtype=torch.float64) * 5 + 0.5
    u = kappa * mu
    un = u.norm(dim=1)
    logc = 127 - 0.01909 * un - 0.003355 * un**2
    det = kappa.log().sum(1) - un.log()
    point = logc + (F.normalize(z[:, None] * kappa, dim=-1) * F.normalize(u, dim=-1)).sum(-1) * un + det
    assert torch.allclose(nivmf_log_density(z, mu, kappa, "official"), point, atol=1e-9)
    el = logc + un * (z @ F.normalize(u, dim=-1).T) + det
    assert torch.allclose(nivmf_log_density(z, mu, kappa, "official", project=False), el, atol=1e-9)
    # isotropic κ = k: the reference's f is the vMF times k^(D−1) (up to its fitted normaliser)
    k = 3.0
    iso = nivmf_log_density(z, mu, torch.full((3, dim), k, dtype=torch.float64), "official")
    exact = nivmf_log_density(z, mu, torch.full((3, dim), k, dtype=torch.float64))
    fit_minus_exact = (127 - 0.01909 * k - 0.003355 * k**2) - log_vmf_normalizer(torch.tensor(k, dtype=torch.float64), dim)
    assert torch.allclose(iso - exact, (dim - 1) * math.log(k) + fit_minus_exact, atol=1e-8)


def test_monte_carlo_expected_likelihood_matches_the_closed_form_ppk():
    """Isotropic proxy, T = 1: log E_{z~vMF(μ1,κ1)} vMF(z; μ2, κ2) = log PPK₁ = log C(κ1) + log C(κ2) − log C(‖κ1μ1 + κ2μ2‖),
    within 3 standard errors of the Monte Carlo mean."""
    torch.manual_seed(0)
    dim = 6
    mu1, mu2 = unit(torch.randn(1, dim, dtype=torch.float64)), unit(torch.randn(1, dim, dtype=torch.float64))
    k1, k2 = torch.tensor([3.0], dtype=torch.float64), 2.0
    z = sample_vmf(mu1, k1, 200000).reshape(-1, dim)
    f = nivmf_log_density(z, mu2, torch.full((1, dim), k2, dtype=torch.float64)).exp().squeeze(1)
    joint = (k1 * mu1 + k2 * mu2).norm()
    ppk = (log_vmf_normalizer(k1, dim) + log_vmf_normalizer(torch.tensor([k2], dtype=torch.float64), dim)
           - log_vmf_normalizer(joint[None], dim)).exp().item()
    assert abs(f.mean().item() - ppk) < 3 * f.std().item() / math.sqrt(f.numel())


# -------------------------------------------------------------------------------------------- the loss


def test_registered_with_shapes_and_defaults():
    assert "nivmf" in losses.available()
    loss = losses.build("nivmf", num_classes=C, embedding_size=D)
    assert loss.distance == "el_nivmf" and loss.mc_samples == 5 and loss.guidance == 3.0
    assert loss.proxies.shape == (C, D) and loss.kappa.shape == (C, D)
    assert loss.temperature.item() == pytest.approx(0.003) and loss.temperature.requires_grad
    assert torch.all(loss.kappa == 6.0)
    assert build("el_vmf").kappa.shape == (C, 1)
    assert loss.lr_multipliers() == {"kappa": 4.0, "temperature": 0.04}
    assert "distance=el_nivmf" in repr(loss)


@pytest.mark.parametrize("distance", DISTANCES)
def test_gradients_reach_embeddings_directions_concentrations_and_temperature(distance):
    loss = build(distance)
    x, y = batch()
    x.requires_grad_(True)
    torch.manual_seed(0)
    out = loss(x, y)
    assert out.ndim == 0 and torch.isfinite(out)
    out.backward()
    for g in (x.grad, loss.proxies.grad, loss.kappa.grad, loss.temperature.grad):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


@pytest.mark.parametrize("distance", DISTANCES)
def test_gradcheck_float64(distance):
    loss = build(distance, embedding_size=4, num_classes=3).double()
    x = 2 * torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 0, 1])
    params = {n: p.detach().clone() for n, p in loss.named_parameters()}
    with torch.no_grad():
        params["temperature"].fill_(0.5)  # moderate logits so finite differences are meaningful
        params["kappa"].uniform_(1.0, 3.0)

    def f(x, proxies, kappa, temperature):
        torch.manual_seed(0)  # the same Monte Carlo draws at every evaluation
        return functional_call(loss, {"proxies": proxies, "kappa": kappa, "temperature": temperature}, (x, y))

    inputs = (x.requires_grad_(True), *(params[n].requires_grad_(True) for n in ("proxies", "kappa", "temperature")))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5)


def test_large_image_concentration_reduces_to_the_deterministic_normalised_softmax():
    """κ_i → ∞ (huge embedding norms) and isotropic proxies κ_c = k: EL-nivMF → CE(k·cos/T) = normalised
    softmax with temperature T/k, the deterministic counterpart (ProxyNCA++ form)."""
    k, t = 4.0, 0.5
    loss = build("el_nivmf", temperature=t, concentration=k, learn_temperature=False, mc_samples=3).double()
    x, y = batch(dtype=torch.float64)
    ns = losses.build("normalized_softmax", num_classes=C, embedding_size=D, temperature=t / k).double()
    with torch.no_grad():
        ns.proxies.copy_(loss.proxies)
    expected = ns(x, y).item()
    assert build("nivmf", temperature=t, concentration=k, learn_temperature=False).double()(x, y).item() == pytest.approx(
        expected, rel=1e-9)  # the point version is the limit itself
    far = loss(x * 1e9 / x.norm(dim=1, keepdim=True), y).item()
    near = loss(x, y).item()
    assert far == pytest.approx(expected, rel=1e-5)
    assert abs(near - expected) > 1e-3  # finite concentration: genuinely different


def test_closed_form_vmf_distances_by_hand():
    """D = 3, C_3(κ) = κ/(4π sinh κ): embedding (2, 0, 0) (κ_i = 2), proxies e₁, e₂ with κ_c = 1, T = 1."""
    def log_c3(k):
        return math.log(k / (4 * math.pi * math.sinh(k)))

    x, y = torch.tensor([[2.0, 0.0, 0.0], [2.0, 0.0, 0.0]]), torch.tensor([0, 0])

    def run(distance):
        loss = build(distance, num_classes=2, embedding_size=3, temperature=1.0, learn_temperature=False, concentration=1.0)
        with torch.no_grad():
            loss.proxies.copy_(torch.eye(3)[:2])
        return loss(x, y).item()

    def ce(s0, s1):
        return -s0 + math.log(math.exp(s0) + math.exp(s1))

    el = [log_c3(2) + log_c3(1) - log_c3(j) for j in (3.0, math.sqrt(5))]  # ‖2e₁ + e₁‖ = 3, ‖2e₁ + e₂‖ = √5
    assert run("el_vmf") == pytest.approx(ce(*el), rel=1e-5)
    b = [0.5 * (log_c3(2) + log_c3(1)) - log_c3(0.5 * j) for j in (3.0, math.sqrt(5))]
    assert run("b_vmf") == pytest.approx(ce(*b), rel=1e-5)
    a2 = 1 / math.tanh(2) - 1 / 2  # A_3(κ) = coth κ − 1/κ
    kl = [-(log_c3(2) - log_c3(1) + a2 * (2 - cos)) for cos in (1.0, 0.0)]
    assert run("kl_vmf") == pytest.approx(ce(*kl), rel=1e-5)


def test_guidance_adds_proxy_anchor_on_the_directions():
    x, y = batch()
    plain, guided = build("nivmf"), build("nivmf", guidance=3.0)
    pa = losses.build("proxy_anchor", num_classes=C, embedding_size=D)
    with torch.no_grad():
        pa.proxies.copy_(plain.proxies)
    assert guided(x, y).item() == pytest.approx(plain(x, y).item() + 3 * pa(x, y).item(), rel=1e-5)


def test_norm_is_the_image_concentration():
    """Unlike the cosine losses, scaling an embedding changes the EL-nivMF loss (the vMF gets sharper)."""
    loss = build("el_vmf")
    x, y = batch()
    assert loss(2 * x, y).item() != pytest.approx(loss(x, y).item(), rel=1e-3)


def test_half_precision_is_computed_in_float32():
    loss = build("nivmf")
    x, y = batch()
    out = loss(x.half(), y)
    assert out.dtype == torch.float32 and out.item() == pytest.approx(loss(x.half().float(), y).item(), rel=1e-6)


def test_errors():
    x, y = batch()
    with pytest.raises(ConfigError, match="model.normalize=false"):
        build()(F.normalize(x, dim=1), y)
    loss = build().eval()
    assert torch.isfinite(loss(F.normalize(x, dim=1), y))  # evaluation mode: no training-time check
    with pytest.raises(ConfigError, match="distance"):
        build("ppk")
    with pytest.raises(ConfigError, match="variant"):
        build(variant="paper")
    with pytest.raises(ConfigError, match="128 or 512"):
        build(variant="official")
    assert build(variant="official", embedding_size=128).variant == "official"
    with pytest.raises(ConfigError, match="mc_samples"):
        build(mc_samples=0)
    with pytest.raises(ConfigError, match="temperature"):
        build(temperature=0.0)
    with pytest.raises(LabelError, match="labels must lie in"):
        build()(x, torch.full_like(y, C))
    with pytest.raises(InputError, match="embedding_size"):
        build()(torch.randn(4, D + 1), y[:4])
    with pytest.raises(ConfigError, match="miner"):
        build()(x, y, (torch.tensor([0]), torch.tensor([4]), torch.tensor([1])))


def test_trains_from_the_config_with_unnormalised_embeddings(tmp_path, fast_overrides):
    from deepmetric.training import Trainer, load

    c = load(None, fast_overrides + ["loss.name=nivmf", "model.normalize=false", "optimizer.loss_lr_mult=167"])
    trainer = Trainer(c, tmp_path / "run", progress=False)
    summary = trainer.fit()
    assert trainer.objective.terms["nivmf"].mc_samples == 5  # not the data-set size
    lrs = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs["loss:terms.nivmf.kappa"] == pytest.approx(4 * lrs["loss"])
    assert lrs["loss:terms.nivmf.temperature"] == pytest.approx(0.04 * lrs["loss"])
    assert math.isfinite(summary["test"]["map@r"])
    with pytest.raises(ConfigError, match="model.normalize=false"):
        Trainer(load(None, fast_overrides + ["loss.name=nivmf"]), tmp_path / "normalised", progress=False).fit()
