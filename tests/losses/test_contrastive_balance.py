"""The contrastive loss's balance (Sors et al. 2021): L = L_pos + λ·L_neg and the per-part averaging."""

from __future__ import annotations

import math

import pytest
import torch

from deepmetric import losses
from deepmetric.errors import ConfigError


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(12, 4, generator=g, dtype=torch.float64), torch.arange(4).repeat_interleave(3)


@pytest.mark.parametrize("reduction", ["mean", "avg_nonzero", "sum", "mean_pos_neg"])
def test_loss_is_positive_term_plus_weighted_negative_term(reduction):
    x, y = batch()
    loss = losses.build("contrastive", reduction=reduction, neg_weight=2.5, neg_margin=1.2)
    pos, neg = loss.terms(x, y)
    assert pos.item() > 0 and neg.item() > 0
    assert loss(x, y).item() == pytest.approx(pos.item() + 2.5 * neg.item(), rel=1e-12)
    # neg_weight = 1 is the usual loss: the terms do not depend on λ
    plain = losses.build("contrastive", reduction=reduction, neg_margin=1.2)
    assert plain(x, y).item() == pytest.approx(pos.item() + neg.item(), rel=1e-12)


def test_mean_pos_neg_by_hand():
    # 1-D points, Euclidean (normalize=False): classes {0, 0.5} and {2}; margins (0, 1)
    x = torch.tensor([[0.0], [0.5], [2.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1])
    loss = losses.build("contrastive", normalize=False, reduction="mean_pos_neg", neg_margin=1.8)
    pos, neg = loss.terms(x, y)
    assert pos.item() == pytest.approx(0.5)  # both ordered positive pairs have d = 0.5
    # negative pairs (ordered): d = 2, 1.5, 2, 1.5 -> [1.8 − d]_+ = 0, 0.3, 0, 0.3
    assert neg.item() == pytest.approx(0.6 / 4)


def orthogonal_classes(n_classes: int, delta: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """Two samples per class at ±delta around the class's own axis pair: every positive pair has the same
    distance, every negative pair the same distance √2 (the classes are orthogonal)."""
    x = torch.zeros(2 * n_classes, 2 * n_classes, dtype=torch.float64)
    for c in range(n_classes):
        x[2 * c, 2 * c], x[2 * c, 2 * c + 1] = math.cos(delta), math.sin(delta)
        x[2 * c + 1, 2 * c], x[2 * c + 1, 2 * c + 1] = math.cos(delta), -math.sin(delta)
    return x, torch.arange(n_classes).repeat_interleave(2)


def test_mean_pos_neg_keeps_the_balance_when_the_batch_grows():
    loss = losses.build("contrastive", reduction="mean_pos_neg", neg_margin=2.0)
    small, large = loss.terms(*orthogonal_classes(2)), loss.terms(*orthogonal_classes(8))
    assert small[0].item() == pytest.approx(large[0].item()) and small[1].item() == pytest.approx(large[1].item())
    # averaging all pairs together shifts the weight to the negatives as B grows (#neg/#pos ∝ B)
    mean = losses.build("contrastive", reduction="mean", neg_margin=2.0)
    (p2, n2), (p8, n8) = mean.terms(*orthogonal_classes(2)), mean.terms(*orthogonal_classes(8))
    assert (n8 / p8).item() == pytest.approx(7 * (n2 / p2).item())  # 2(P−1) negatives per positive pair


def test_neg_weight_must_be_nonnegative():
    with pytest.raises(ConfigError, match="neg_weight"):
        losses.build("contrastive", neg_weight=-1)
    with pytest.raises(ConfigError, match="reduction"):
        losses.build("contrastive", reduction="median")


def test_infonce_decomposition_by_hand():
    # a = (1, 0), p = (cos t, sin t) share class 0; n = (0, 1) is class 1. Ordered positive pairs (a, p), (p, a).
    t, tau = 0.7, 0.25
    c, s = math.cos(t), math.sin(t)
    x = torch.tensor([[1.0, 0.0], [c, s], [0.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1])
    loss = losses.build("ntxent", temperature=tau)
    pos, ent = loss.terms(x, y)
    assert pos.item() == pytest.approx(-c)
    lse_a, lse_p = math.log(math.exp(c / tau) + 1.0), math.log(math.exp(c / tau) + math.exp(s / tau))
    assert ent.item() == pytest.approx((lse_a + lse_p) / 2)
    assert loss(x, y).item() == pytest.approx(-c / tau + (lse_a + lse_p) / 2)


@pytest.mark.parametrize("tau", [0.05, 0.1, 1.0])
def test_infonce_identity_and_temperature_weights_the_entropy_term(tau):
    x, y = batch(3)
    loss = losses.build("ntxent", temperature=tau)
    pos, ent = loss.terms(x, y)
    # τ·L = L_pos + τ·L_ent: the temperature is the balance, the alignment term does not depend on it
    assert (tau * loss(x, y)).item() == pytest.approx(pos.item() + tau * ent.item(), rel=1e-10)
    assert pos.item() == pytest.approx(losses.build("ntxent", temperature=0.5).terms(x, y)[0].item())
    x = x.clone().requires_grad_()
    sum(loss.terms(x, y)).backward()
    assert torch.isfinite(x.grad).all()


def test_infonce_terms_without_negatives_are_zero_and_backpropagate():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    pos, ent = losses.build("ntxent").terms(x, torch.zeros(4, dtype=torch.long))
    assert pos.item() == 0 and ent.item() == 0
    (pos + ent).backward()
    assert torch.isfinite(x.grad).all()


def test_losses_without_a_decomposition_say_so():
    x, y = batch()
    with pytest.raises(NotImplementedError, match="TripletMarginLoss has no positive/negative decomposition"):
        losses.build("triplet").terms(x, y)
