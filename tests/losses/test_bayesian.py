"""Tests of contrastive Bayesian metric learning (deepmetric.losses.bayesian)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from deepmetric import losses
from deepmetric.errors import ConfigError


def reference(x, labels, pos_a=0.5, pos_b=0.5, neg_a=1.0, neg_b=0.01, weight=1.0, h=0.1, epsilon=0.1,
              variant="log", const_weight=0.25, hard_negatives=None):
    """Per-anchor loop written after the official code (kanshichao/CBML, losses/cbml.py)."""
    x = F.normalize(x, dim=1)
    sim = x @ x.T
    total = x.new_zeros(())
    for i in range(x.shape[0]):
        same = labels == labels[i]
        same[i] = False  # the official code drops it through s >= 1 - 1e-5
        pos_ = sim[i][same]
        pos_ = pos_[pos_ < 1 - 1e-5]
        neg_ = sim[i][labels != labels[i]]
        if len(pos_) < 1 or len(neg_) < 1:
            continue
        mu = h * pos_.mean() + (1 - h) * neg_.mean()
        var = ((neg_ - mu) ** 2).sum()
        pos = pos_[pos_ - epsilon < neg_.max()]
        neg = neg_[neg_ + epsilon > pos_.min()] if hard_negatives is None else neg_[torch.argsort(neg_)[-hard_negatives:]]
        if len(pos) < 1 or len(neg) < 1:
            continue
        sp = torch.exp(-(pos - pos_a) / pos_b).sum()
        sn = torch.exp((neg - neg_a) / neg_b).sum()
        if variant == "log":
            lp, ln = torch.log(1 + sp), torch.log(1 + sn)
        elif variant == "sqrt":
            lp, ln = torch.sqrt(1 + sp), torch.sqrt(1 + sn)
        else:
            lp, ln = 1 + const_weight * sp, 1 + const_weight * sn
        total = total + lp + ln + weight * var
    return total / x.shape[0]


def unit(*angles_deg):
    a = torch.tensor(angles_deg, dtype=torch.float64) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], 1)


def hand_batch():
    """Anchor a (0°), positive p (60°, s = 0.5), negative n (s_an = 0.45). Anchor p's positive is not mined
    (0.5 − 0.1 ≥ s_pn < 0) and n has no positive, so only anchor a counts."""
    theta = math.degrees(math.acos(0.45))
    return unit(0, 60, -theta), torch.tensor([0, 0, 1])


@pytest.mark.parametrize("variant, expected_terms", [
    ("log", math.log(2) + math.log1p(math.exp(-55))),
    ("sqrt", math.sqrt(2) + math.sqrt(1 + math.exp(-55))),
    ("const", (1 + 0.25 * 1) + (1 + 0.25 * math.exp(-55))),
])
def test_one_anchor_by_hand(variant, expected_terms):
    x, y = hand_batch()
    mu = 0.1 * 0.5 + 0.9 * 0.45  # h·mean(P) + (1 − h)·mean(N)
    variance = (0.45 - mu) ** 2
    loss = losses.build("contrastive_bayesian", variant=variant)(x, y)
    assert loss.item() == pytest.approx((expected_terms + variance) / 3, rel=1e-9)


def test_variance_is_zero_when_every_negative_equals_mu():
    # every cross-class similarity is the same c; with h = 0, μ_i = mean(N_i) = c, so V_i = 0 for every anchor
    a, b = math.radians(20), math.radians(30)
    x = torch.tensor([[math.cos(a), math.sin(a), 0], [math.cos(a), -math.sin(a), 0],
                      [-math.cos(b), 0, math.sin(b)], [-math.cos(b), 0, -math.sin(b)]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    with_v = losses.build("contrastive_bayesian", h=0.0, epsilon=3.0, weight=1.0)(x, y)
    without_v = losses.build("contrastive_bayesian", h=0.0, epsilon=3.0, weight=0.0)(x, y)
    assert with_v.item() == pytest.approx(without_v.item(), abs=1e-12)
    assert without_v.item() > 0  # all four anchors count
    # with h > 0, μ moves towards the positives and V > 0
    shifted = losses.build("contrastive_bayesian", h=0.5, epsilon=3.0, weight=1.0)(x, y)
    c = (x[0] @ x[2]).item()
    per_anchor = [2 * (0.5 * (c - (x[i] @ x[j]).item())) ** 2 for i, j in ((0, 1), (1, 0), (2, 3), (3, 2))]
    expected_v = sum(per_anchor) / 4  # Σ_n (c − μ_i)² with c − μ_i = ½(c − s_ip), two negatives each
    assert (shifted - without_v).item() == pytest.approx(expected_v, rel=1e-9)


@pytest.mark.parametrize("kwargs", [
    {}, {"variant": "sqrt"}, {"variant": "const", "const_weight": 0.5}, {"h": 0.2, "weight": 0.3},
    {"hard_negatives": 2}, {"epsilon": 0.5, "neg_b": 0.1, "neg_a": 0.4},
])
def test_matches_the_official_per_anchor_loop(kwargs):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(15, 4, generator=g, dtype=torch.float64)
    y = torch.arange(5).repeat_interleave(3)
    got = losses.build("contrastive_bayesian", **kwargs)(x, y)
    assert got.item() == pytest.approx(reference(x, y, **kwargs).item(), rel=1e-9)
    assert got.item() > 0


def test_duplicates_are_dropped_from_the_positives():
    x, y = hand_batch()
    x = torch.cat([x, x[:1]])  # an exact copy of the anchor, same label: s = 1, not a positive
    y = torch.cat([y, y[:1]])
    got = losses.build("contrastive_bayesian")(x, y)
    assert got.item() == pytest.approx(reference(x, y).item(), rel=1e-9)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.arange(3).repeat_interleave(3)
    for variant in ("log", "sqrt", "const"):
        loss = losses.build("contrastive_bayesian", variant=variant, epsilon=0.5, neg_b=0.2)
        assert torch.autograd.gradcheck(lambda t: loss(t, y), (x,))


def test_half_precision_and_empty_sets():
    x, y = hand_batch()
    loss = losses.build("contrastive_bayesian")
    assert loss(x.half(), y).dtype == torch.float32
    single = torch.randn(4, 3, requires_grad=True)
    out = loss(single, torch.zeros(4, dtype=torch.long))  # one class: no negatives, every anchor skipped
    out.backward()
    assert out.item() == 0 and torch.equal(single.grad, torch.zeros_like(single))


def test_bad_parameters():
    with pytest.raises(ConfigError, match="variant"):
        losses.build("contrastive_bayesian", variant="exp")
    with pytest.raises(ConfigError, match="pos_b"):
        losses.build("contrastive_bayesian", pos_b=0)
