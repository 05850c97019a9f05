"""Tests of the pair-based losses (deepmetric.losses.pair)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from deepmetric import losses
from deepmetric.errors import InputError, LabelError

# Every registered pair loss, with keywords that make its generic properties testable.
CASES = {
    "multi_similarity": {},
    "multi_similarity_nomining": {"mining": False},
}


def build(case: str) -> torch.nn.Module:
    name = case.split("_nomining")[0]
    return losses.build(name, **CASES[case])


def batch(n_classes=4, per_class=3, dim=5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    x = torch.randn(labels.numel(), dim, generator=g, dtype=dtype)
    return x, labels


def unit(*angles_deg):
    a = torch.tensor(angles_deg, dtype=torch.float64) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], 1)


# ------------------------------------------------------------------------------------- generic properties


@pytest.mark.parametrize("case", CASES)
def test_gradcheck_float64(case):
    loss = build(case).double()
    x, y = batch(n_classes=3, per_class=2, dim=3, seed=1, dtype=torch.float64)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e: loss(e, y), (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_permutation_invariance(case):
    loss = build(case)
    x, y = batch(seed=2)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss(x, y), loss(x[perm], y[perm]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("labels", [[0, 0, 0, 0], [0, 1, 2, 3]], ids=["no_negative", "no_positive"])
def test_degenerate_batch_zero_loss_backpropagates(case, labels):
    loss = build(case)
    x = torch.randn(4, 6, requires_grad=True)
    out = loss(x, torch.tensor(labels))
    assert out.requires_grad and out.item() == 0.0
    out.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("case", CASES)
def test_half_precision_matches_float32(case):
    loss = build(case)
    x, y = batch(seed=3, dim=8)
    x16 = x.half()
    out16 = loss(x16, y)
    assert out16.dtype == torch.float32
    torch.testing.assert_close(out16, loss(x16.float(), y), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out16, loss(x, y), rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("case", CASES)
def test_identical_points_finite_gradient(case):
    loss = build(case)
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], requires_grad=True)
    loss(x, torch.tensor([0, 0, 1, 1])).backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("case", CASES)
def test_refs_equal_batch_terms(case):
    """With references and no self-pairs, a loss of (x, ref=other) uses exactly the cross pairs."""
    loss = build(case)
    x, y = batch(seed=4)
    ref, ref_y = batch(seed=5)
    out = loss(x, y, ref_embeddings=ref, ref_labels=ref_y)
    assert torch.isfinite(out) and out.ndim == 0


@pytest.mark.parametrize("case", CASES)
def test_bad_input(case):
    loss = build(case)
    x, y = batch()
    with pytest.raises(LabelError):
        loss(x, y[:-1])
    with pytest.raises(InputError):
        loss(x[:, 0], y)
    with pytest.raises(LabelError):
        loss(x, y.float())
    bad = x.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        loss(bad, y)
    with pytest.raises(InputError, match="at least 2"):
        loss(x[:1], y[:1])
    with pytest.raises(InputError):
        loss(x, y, indices=(torch.tensor([0]), torch.tensor([99]), torch.tensor([1])))


# ------------------------------------------------------------------------------------- multi-similarity


def test_multi_similarity_constructor_attributes():
    loss = losses.build("multi_similarity")
    assert (loss.alpha, loss.beta, loss.base, loss.epsilon, loss.mining) == (2, 50, 0.5, 0.1, True)


def test_multi_similarity_hand_case():
    # anchor (1,0); positive and negative both at cosine 0.5 -> both survive mining
    x = unit(0).float()
    ref = unit(60, -60).float()
    out = losses.build("multi_similarity")(x, torch.tensor([0]), ref_embeddings=ref, ref_labels=torch.tensor([0, 1]))
    expected = 0.5 * math.log(2) + math.log(2) / 50
    assert float(out) == pytest.approx(expected, rel=1e-5)


def test_multi_similarity_easy_negative_ignored():
    loss = losses.build("multi_similarity")
    x = unit(0).float()
    base = loss(x, torch.tensor([0]), ref_embeddings=unit(30, 60).float(), ref_labels=torch.tensor([0, 1]))
    for easy in (100, 150, 180):  # s_n + ε < min s_p = cos 30°
        ref = unit(30, 60, easy).float()
        out = loss(x, torch.tensor([0]), ref_embeddings=ref, ref_labels=torch.tensor([0, 1, 1]))
        assert float(out) == pytest.approx(float(base), rel=1e-6)


def test_multi_similarity_beta_to_infinity():
    x, y = batch(seed=6, dim=4)
    ref, ry = batch(seed=7, dim=4)
    big = 1e4
    loss = losses.build("multi_similarity", beta=big, alpha=2, mining=False)
    s = F.normalize(x, dim=1) @ F.normalize(ref, dim=1).T
    neg = y[:, None] != ry[None, :]
    pos = ~neg
    pos_t = torch.log1p(torch.where(pos, torch.exp(-2 * (s - 0.5)), 0).sum(1)) / 2
    neg_t = (torch.where(neg, s, -1).amax(1) - 0.5).clamp(min=0)
    out = loss(x, y, ref_embeddings=ref, ref_labels=ry)
    assert float(out) == pytest.approx(float((pos_t + neg_t).mean()), abs=1e-3)


def test_multi_similarity_parity_drops_duplicates():
    x = unit(0, 0, 40, 90).float()
    y = torch.tensor([0, 0, 0, 1])
    c40, c50 = math.cos(math.radians(40)), math.cos(math.radians(50))

    def pos_t(*s):
        return math.log1p(sum(math.exp(-2 * (v - 0.5)) for v in s)) / 2

    def neg_t(*s):
        return math.log1p(sum(math.exp(50 * (v - 0.5)) for v in s)) / 50

    plain = losses.build("multi_similarity", mining=False)(x, y)
    expected = 2 * (pos_t(1, c40) + neg_t(0)) + pos_t(c40, c40) + neg_t(c50) + neg_t(0, 0, c50)
    assert float(plain) == pytest.approx(expected / 4, rel=1e-5)
    # parity drops the duplicate pair (0, 1) (s = 1) and skips anchor 3, which has no positive
    parity = losses.build("multi_similarity", mining=False, parity=True)(x, y)
    expected = 2 * (pos_t(c40) + neg_t(0)) + pos_t(c40, c40) + neg_t(c50)
    assert float(parity) == pytest.approx(expected / 4, rel=1e-5)


def test_multi_similarity_matches_pml():
    pml = pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import losses as pl
    from pytorch_metric_learning import miners as pm

    x, y = batch(n_classes=8, per_class=4, dim=16, seed=8)
    ours = losses.build("multi_similarity")(x, y)
    ref = pl.MultiSimilarityLoss(alpha=2, beta=50, base=0.5)(x, y, pm.MultiSimilarityMiner(0.1)(x, y))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    ours = losses.build("multi_similarity", mining=False)(x, y)
    torch.testing.assert_close(ours, pl.MultiSimilarityLoss()(x, y), rtol=1e-5, atol=1e-6)
    del pml
