"""Tests of the pair-based losses (deepmetric.losses.pair)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from deepmetric import losses
from deepmetric.errors import InputError, LabelError

# Every registered pair loss (case id -> registry key, keywords), including its main variants.
CASES = {
    "contrastive": ("contrastive", {}),
    "contrastive_cosine": ("contrastive", {"distance": "cosine", "reduction": "avg_nonzero", "power": 2}),
    "triplet": ("triplet", {}),
    "triplet_soft": ("triplet", {"soft_margin": True, "distance": "euclidean", "reduction": "avg_nonzero"}),
    "npair": ("npair", {"strict": False}),
    "margin": ("margin", {}),
    "margin_per_class": ("margin", {"num_classes": 10, "nu": 0.1}),
    "multi_similarity": ("multi_similarity", {}),
    "multi_similarity_nomining": ("multi_similarity", {"mining": False}),
    "circle": ("circle", {}),
    "supcon": ("supcon", {}),
    "ntxent": ("ntxent", {}),
}


def build(case: str) -> torch.nn.Module:
    name, kwargs = CASES[case]
    return losses.build(name, **kwargs)


def test_every_pair_loss_is_covered():
    pair_losses = {"contrastive", "triplet", "npair", "margin", "multi_similarity", "circle", "supcon", "ntxent"}
    assert pair_losses <= set(losses.available())
    assert {name for name, _ in CASES.values()} == pair_losses


def batch(n_classes=4, per_class=3, dim=5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    x = torch.randn(labels.numel(), dim, generator=g, dtype=dtype)
    return x, labels


def unit(*angles_deg):
    a = torch.tensor(angles_deg, dtype=torch.float64) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], 1)


# ------------------------------------------------------------------------------------- generic properties


@pytest.mark.parametrize("case", [c for c in CASES if c != "circle"])  # circle: see test_circle_detach
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
    if case == "npair":  # anchor/positive roles follow the order within a class: permute whole classes
        perm = (torch.randperm(4, generator=torch.Generator().manual_seed(0))[:, None] * 3 + torch.arange(3)).ravel()
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
def test_inside_an_autocast_region_computes_in_float32(case):
    loss = build(case)
    x, y = batch(seed=4, dim=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = loss(x, y)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, loss(x, y), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", CASES)
def test_identical_points_finite_gradient(case):
    loss = build(case)
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], requires_grad=True)
    loss(x, torch.tensor([0, 0, 1, 1])).backward()
    assert torch.isfinite(x.grad).all()


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
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import losses as pl
    from pytorch_metric_learning import miners as pm

    x, y = batch(n_classes=8, per_class=4, dim=16, seed=8)
    ours = losses.build("multi_similarity")(x, y)
    ref = pl.MultiSimilarityLoss(alpha=2, beta=50, base=0.5)(x, y, pm.MultiSimilarityMiner(0.1)(x, y))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    ours = losses.build("multi_similarity", mining=False)(x, y)
    torch.testing.assert_close(ours, pl.MultiSimilarityLoss()(x, y), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ contrastive


def test_contrastive_hand_case():
    x = torch.tensor([[0.0], [0.0], [0.3]])  # positives identical, negatives 0.3 apart
    y = torch.tensor([0, 0, 1])
    for power, expected in ((1, 0.7), (2, 0.49)):
        loss = losses.build("contrastive", power=power, normalize=False, reduction="avg_nonzero")
        assert loss(x, y).item() == pytest.approx(expected, rel=1e-5)
    # "mean" over all 6 ordered pairs: 4 negatives of 0.7, 2 positives of 0
    mean = losses.build("contrastive", normalize=False)(x, y)
    assert mean.item() == pytest.approx(4 * 0.7 / 6, rel=1e-5)


def test_contrastive_avg_nonzero_and_identical_positives():
    # negative losses [0, 0.4]: two negatives at distances 1.2 and 0.6 from the anchor (m_neg = 1)
    x = torch.tensor([[0.0], [0.0], [1.2], [0.6]], requires_grad=True)
    ref_y = torch.tensor([0, 1, 2])
    loss = losses.build("contrastive", normalize=False, reduction="avg_nonzero")
    out = loss(x[:1], torch.tensor([0]), ref_embeddings=x[1:], ref_labels=ref_y)
    assert out.item() == pytest.approx(0.4, rel=1e-5)
    out.backward()
    assert torch.isfinite(x.grad).all()


def test_contrastive_cosine_margins():
    loss = losses.build("contrastive", distance="cosine")
    assert (loss.pos_margin, loss.neg_margin) == (0.9, 0.6)
    x = unit(0).float()
    ref = unit(60, 30).float()  # positive at s = 0.5 -> 0.4; negative at s = cos 30° -> cos30 - 0.6
    out = loss(x, torch.tensor([0]), ref_embeddings=ref, ref_labels=torch.tensor([0, 1]))
    assert out.item() == pytest.approx((0.4 + math.cos(math.pi / 6) - 0.6) / 2, rel=1e-5)


def test_contrastive_matches_pml():
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import losses as pl

    x, y = batch(n_classes=8, per_class=4, dim=16, seed=9)
    ours = losses.build("contrastive", reduction="avg_nonzero", neg_margin=0.5)(x, y)
    torch.testing.assert_close(ours, pl.ContrastiveLoss(neg_margin=0.5)(x, y), rtol=1e-5, atol=1e-6)


def contrastive_by_autograd(loss, m, y, ref_y, self_ref):
    """The contrastive loss's (L_pos, L_neg) on the matrix m by plain autograd on dense label masks."""
    same = y[:, None] == ref_y[None, :]
    pos = (same & ~torch.eye(*m.shape, dtype=torch.bool)) if self_ref else same
    neg = ~same
    if loss.distance.is_similarity:
        lp, ln = torch.relu(loss.pos_margin - m), torch.relu(m - loss.neg_margin)
    else:
        lp, ln = torch.relu(m - loss.pos_margin), torch.relu(loss.neg_margin - m)
    lp, ln = lp[pos] ** loss.power, ln[neg] ** loss.power
    present = float(bool(pos.any()) and bool(neg.any()))
    if loss.reduction == "avg_nonzero":
        return (lp.sum() / max(int((lp > 0).sum()), 1) * present, ln.sum() / max(int((ln > 0).sum()), 1) * present)
    if loss.reduction == "mean_pos_neg":
        return lp.sum() / max(lp.numel(), 1) * present, ln.sum() / max(ln.numel(), 1) * present
    count = max(lp.numel() + ln.numel(), 1) if loss.reduction == "mean" else 1
    return lp.sum() / count * present, ln.sum() / count * present


@pytest.mark.parametrize("reduction", ["mean", "avg_nonzero", "sum", "mean_pos_neg"])
@pytest.mark.parametrize("distance,power", [("euclidean", 1), ("euclidean", 2), ("cosine", 1), ("cosine", 2)])
@pytest.mark.parametrize("refs", [False, True], ids=["batch", "refs"])
def test_contrastive_hand_written_backward_equals_autograd(reduction, distance, power, refs):
    """The loss's hand-differentiated terms equal plain autograd on the same matrix, value and gradient."""
    loss = losses.build("contrastive", distance=distance, power=power, reduction=reduction, neg_weight=0.7,
                        neg_margin=1.2 if distance == "euclidean" else 0.2).double()
    x, y = batch(n_classes=3, per_class=3, dim=4, seed=31, dtype=torch.float64)
    ref, ref_y = (batch(n_classes=4, per_class=2, dim=4, seed=32, dtype=torch.float64) if refs else (None, y))
    args = {"ref_embeddings": ref.requires_grad_(), "ref_labels": ref_y} if refs else {}
    x.requires_grad_(True)
    ours = loss.terms(x, y, **args)
    m = loss.distance(x, ref)
    expected = contrastive_by_autograd(loss, m, y, ref_y, not refs)
    for a, b in zip(ours, expected):
        assert b.item() > 0
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    inputs = (x, ref) if refs else (x,)
    for a, b in zip(torch.autograd.grad(ours[0] + 0.7 * ours[1], inputs),
                    torch.autograd.grad(expected[0] + 0.7 * expected[1], inputs)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda e: loss(e, y, **args), (x,), eps=1e-6, atol=1e-5)


# --------------------------------------------------------------------------------------------- triplet


def test_triplet_hand_case():
    loss = losses.build("triplet", normalize=False)
    a, p, n = [0.0, 0.0], [1.0, 0.0], [0.0, 2.0]
    idx = (torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))
    assert loss(torch.tensor([a, p, n]), torch.tensor([0, 0, 1]), idx).item() == 0.0
    assert loss(torch.tensor([a, n, p]), torch.tensor([0, 0, 1]), idx).item() == pytest.approx(3.2)


def test_triplet_separated_clusters_zero():
    x = torch.tensor([[1.0, 0.0], [0.99, 0.05], [-1.0, 0.0], [-0.98, -0.1]])
    assert losses.build("triplet")(x, torch.tensor([0, 0, 1, 1])).item() == 0.0


def test_triplet_all_triplets_brute_force():
    x, y = batch(n_classes=3, per_class=3, dim=4, seed=10)
    loss = losses.build("triplet", margin=0.3, normalize=False, distance="euclidean", reduction="sum")
    d = torch.cdist(x, x)
    expected = sum(
        max(d[a, p] - d[a, n] + 0.3, 0)
        for a in range(9)
        for p in range(9)
        for n in range(9)
        if a != p and y[a] == y[p] and y[a] != y[n]
    )
    assert loss(x, y).item() == pytest.approx(float(expected), rel=1e-5)


def test_triplet_from_pairs_equals_pml_conversion():
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import distances as pd
    from pytorch_metric_learning import losses as pl
    from pytorch_metric_learning import miners as pm

    x, y = batch(n_classes=6, per_class=4, dim=8, seed=11)
    pml = pl.TripletMarginLoss(margin=0.2, distance=pd.LpDistance(power=2))
    ours = losses.build("triplet", reduction="avg_nonzero")
    torch.testing.assert_close(ours(x, y), pml(x, y), rtol=1e-5, atol=1e-6)
    pairs = pm.MultiSimilarityMiner(0.1)(x, y)
    torch.testing.assert_close(ours(x, y, pairs), pml(x, y, pairs), rtol=1e-5, atol=1e-6)
    trip = pm.TripletMarginMiner(margin=0.2, type_of_triplets="semihard", distance=pd.LpDistance(power=2))(x, y)
    torch.testing.assert_close(ours(x, y, trip), pml(x, y, trip), rtol=1e-5, atol=1e-6)
    soft = losses.build("triplet", soft_margin=True, margin=0.05, distance="euclidean")
    torch.testing.assert_close(
        soft(x, y), pl.TripletMarginLoss(margin=0.05, smooth_loss=True)(x, y), rtol=1e-5, atol=1e-6
    )


# ---------------------------------------------------------------------------------------------- n-pair


def test_npair_hand_case():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    y = torch.tensor([0, 0, 1, 1])
    out = losses.build("npair", l2_reg=0.0)(x, y)
    assert out.item() == pytest.approx(math.log1p(math.exp(-1)), rel=1e-6)
    # the regulariser: λ·¼·(mean‖f‖² + mean‖f⁺‖²) = 0.002 · ¼ · (1 + 1)
    assert losses.build("npair")(x, y).item() == pytest.approx(math.log1p(math.exp(-1)) + 0.001, rel=1e-6)
    x2 = x * torch.tensor([[3.0], [1.0], [2.0], [1.0]])
    reg = losses.build("npair", l2_reg=1.0)(x2, y) - losses.build("npair", l2_reg=0.0)(x2, y)
    assert reg.item() == pytest.approx(0.25 * ((9 + 4) / 2 + 1), rel=1e-5)


def test_npair_equals_cross_entropy_and_symmetric():
    g = torch.Generator().manual_seed(12)
    a, p = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    x = torch.stack([a, p], 1).reshape(10, 6)  # anchor, positive, anchor, positive, ...
    y = torch.arange(5).repeat_interleave(2)
    ce = F.cross_entropy(a @ p.T, torch.arange(5))
    torch.testing.assert_close(losses.build("npair", l2_reg=0.0)(x, y), ce)
    sym = 0.5 * (ce + F.cross_entropy(p @ a.T, torch.arange(5)))
    torch.testing.assert_close(losses.build("npair", l2_reg=0.0, symmetric=True)(x, y), sym)
    tuplet = F.cross_entropy(25 * F.normalize(a, dim=1) @ F.normalize(p, dim=1).T, torch.arange(5))
    out = losses.build("npair", l2_reg=0.0, normalize=True, scale=25)(x, y)
    torch.testing.assert_close(out, tuplet)


def test_npair_rejects_invalid_batches():
    loss = losses.build("npair")
    x = torch.randn(5, 3)
    with pytest.raises(InputError, match="exactly 2"):
        loss(x, torch.tensor([0, 0, 1, 1, 2]))  # a singleton
    with pytest.raises(InputError, match="exactly 2"):
        loss(x, torch.tensor([0, 0, 0, 1, 1]))  # a class appearing in two pairs


def test_npair_matches_pml():
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import losses as pl

    x, y = batch(n_classes=8, per_class=4, dim=16, seed=13)
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(1))
    x, y = x[perm], y[perm]
    # PML's default DotProductSimilarity normalises the embeddings
    ours = losses.build("npair", l2_reg=0.0, strict=False, normalize=True)(x, y)
    torch.testing.assert_close(ours, pl.NPairsLoss()(x, y), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- margin


def _chord_points(d_ap, d_an):
    """Unit vectors: anchor at 0°, positive and negative at chord distances d_ap and d_an."""
    tp, tn = 2 * math.asin(d_ap / 2), 2 * math.asin(d_an / 2)
    return torch.tensor([[1.0, 0.0], [math.cos(tp), math.sin(tp)], [math.cos(tn), -math.sin(tn)]])


def test_margin_hand_case_and_beta_gradient():
    loss = losses.build("margin")
    x = _chord_points(0.9, 1.2)
    out = loss(x, torch.tensor([0, 0, 1]), (torch.tensor([0]), torch.tensor([1]), torch.tensor([2])))
    assert out.item() == pytest.approx(0.2, abs=1e-5)
    out.backward()
    assert loss.beta.grad.item() == pytest.approx(1.0)
    assert isinstance(loss.beta, torch.nn.Parameter) and loss.beta.requires_grad


def test_margin_triplet_multiplicities_equal_explicit_triplets():
    x, y = batch(n_classes=3, per_class=3, dim=4, seed=14)
    loss = losses.build("margin", num_classes=3, nu=0.3)
    a, p, n = zip(*[(a, p, n) for a in range(9) for p in range(9) for n in range(9)
                    if a != p and y[a] == y[p] and y[a] != y[n]])
    explicit = loss(x, y, (torch.tensor(a), torch.tensor(p), torch.tensor(n)))
    torch.testing.assert_close(loss(x, y), explicit)
    # a repeated triplet counts twice
    trip = (torch.tensor([0, 0]), torch.tensor([1, 1]), torch.tensor([5, 5]))
    d = torch.cdist(F.normalize(x, dim=1), F.normalize(x, dim=1))
    lp, ln = max(0.2 + d[0, 1] - 1.2, 0), max(0.2 - d[0, 5] + 1.2, 0)
    expected = (2 * lp + 2 * ln + 0.3 * 2 * 1.2) / (2 * (lp > 0) + 2 * (ln > 0))
    assert loss(x, y, trip).item() == pytest.approx(float(expected), rel=1e-5)


def test_margin_per_class_beta_needs_valid_labels():
    loss = losses.build("margin", num_classes=2)
    with pytest.raises(LabelError, match="num_classes"):
        loss(torch.randn(4, 3), torch.tensor([0, 0, 2, 2]))


def test_margin_matches_pml():
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import losses as pl

    x, y = batch(n_classes=8, per_class=4, dim=16, seed=15)
    ours = losses.build("margin", alpha=0.2, beta=1.0)(x, y)
    torch.testing.assert_close(ours, pl.MarginLoss(margin=0.2, beta=1.0)(x, y), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- circle


def test_circle_hand_case():
    x = unit(0)
    ref = unit(60, 80)  # s_p = 0.5, s_n = cos 80°
    sp, sn, m, g = 0.5, math.cos(math.radians(80)), 0.4, 80
    ap, an = max(1 + m - sp, 0), max(sn + m, 0)
    expected = math.log1p(math.exp(g * an * (sn - m)) * math.exp(-g * ap * (sp - (1 - m))))
    out = losses.build("circle").double()(x, torch.tensor([0]), ref_embeddings=ref, ref_labels=torch.tensor([0, 1]))
    assert out.item() == pytest.approx(expected, rel=1e-6)


def test_circle_detach():
    """The analytic gradient treats α_p, α_n as constants: it matches finite differences of the loss
    with α frozen at the current point, and not those of the loss with α varying."""
    x, y = batch(n_classes=2, per_class=2, dim=3, seed=16, dtype=torch.float64)
    m, g = 0.4, 2.0
    loss = losses.build("circle", gamma=g).double()
    x0 = x.clone().requires_grad_(True)
    loss(x0, y).backward()

    def frozen(e, e_alpha):
        s, s0 = F.normalize(e, dim=1) @ F.normalize(e, dim=1).T, F.normalize(e_alpha, dim=1) @ F.normalize(e_alpha, dim=1).T
        pos = (y[:, None] == y[None, :]) & ~torch.eye(4, dtype=torch.bool)
        neg = y[:, None] != y[None, :]
        lp = torch.where(pos, -g * (1 + m - s0).clamp(min=0) * (s - 1 + m), -torch.inf).logsumexp(1)
        ln = torch.where(neg, g * (s0 + m).clamp(min=0) * (s - m), -torch.inf).logsumexp(1)
        return F.softplus(lp + ln).mean()

    assert frozen(x, x).item() == pytest.approx(loss(x, y).item(), rel=1e-10)
    num_frozen = torch.autograd.functional.jacobian(lambda e: frozen(e, x), x)
    num_full = torch.autograd.functional.jacobian(lambda e: frozen(e, e), x)
    torch.testing.assert_close(x0.grad, num_frozen)
    assert not torch.allclose(x0.grad, num_full)
    assert torch.autograd.gradcheck(lambda e: frozen(e, x), (x.clone().requires_grad_(True),))


def test_circle_large_gamma_limit():
    x, y = batch(n_classes=3, per_class=3, dim=4, seed=17, dtype=torch.float64)
    m, g = 0.4, 1e5
    out = losses.build("circle", gamma=g).double()(x, y)
    s = F.normalize(x, dim=1) @ F.normalize(x, dim=1).T
    pos = (y[:, None] == y[None, :]) & ~torch.eye(9, dtype=torch.bool)
    neg = y[:, None] != y[None, :]
    vp = torch.where(pos, (1 + m - s).clamp(min=0) * (s - 1 + m), torch.inf).amin(1)
    vn = torch.where(neg, (s + m).clamp(min=0) * (s - m), -torch.inf).amax(1)
    assert (out / g).item() == pytest.approx((vn - vp).clamp(min=0).mean().item(), rel=1e-3, abs=1e-6)


def test_circle_matches_pml():
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import losses as pl

    x, y = batch(n_classes=8, per_class=4, dim=16, seed=18)
    torch.testing.assert_close(losses.build("circle")(x, y), pl.CircleLoss()(x, y), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ supcon / nt-xent


def test_supcon_and_ntxent_hand_case():
    x = unit(0).float()
    ref = unit(40, 50, 100).float()  # two positives, one negative
    ry = torch.tensor([0, 0, 1])
    t = 0.1
    sp1, sp2, sn = (math.cos(math.radians(a)) / t for a in (40, 50, 100))
    lse_all = math.log(math.exp(sp1) + math.exp(sp2) + math.exp(sn))
    supcon = losses.build("supcon")(x, torch.tensor([0]), ref_embeddings=ref, ref_labels=ry)
    assert supcon.item() == pytest.approx(lse_all - (sp1 + sp2) / 2, rel=1e-5)
    ntx = losses.build("ntxent")(x, torch.tensor([0]), ref_embeddings=ref, ref_labels=ry)
    expected = sum(math.log1p(math.exp(sn - sp)) for sp in (sp1, sp2)) / 2
    assert ntx.item() == pytest.approx(expected, rel=1e-5)


def test_supcon_ntxent_match_pml():
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import losses as pl

    x, y = batch(n_classes=8, per_class=4, dim=16, seed=19)
    torch.testing.assert_close(
        losses.build("supcon", temperature=0.1)(x, y), pl.SupConLoss(temperature=0.1)(x, y), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        losses.build("ntxent", temperature=0.07)(x, y), pl.NTXentLoss(temperature=0.07)(x, y), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("labels", [[0, 0, 1, 1, 1, 2], [0, 0, 1, 2, 3, 3], [5, 5, 5, 5, 5, 5]],
                         ids=["classes", "singletons", "one_class"])
@pytest.mark.parametrize("with_refs", [False, True])
def test_supcon_label_path_equals_general_path(labels, with_refs):
    """No miner: SupCon's one-logsumexp node equals the general node fed every pair, values and gradients."""
    loss = losses.build("supcon", temperature=0.2).double()
    g = torch.Generator().manual_seed(5)
    y = torch.tensor(labels)
    x = torch.randn(6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    refs = {}
    if with_refs:
        ry = torch.tensor([labels[0], 7, labels[-1], 7, labels[2]])
        refs = {"ref_embeddings": torch.randn(5, 4, dtype=torch.float64, generator=g), "ref_labels": ry}
        same = y[:, None] == ry[None, :]
    else:
        same = (y[:, None] == y[None, :]) & ~torch.eye(6, dtype=torch.bool)
    diff = (y[:, None] != (refs["ref_labels"] if with_refs else y)[None, :])
    indices = (*torch.where(same), *torch.where(diff))
    fast, general = loss(x, y, **refs), loss(x, y, indices, **refs)
    (g_fast,) = torch.autograd.grad(fast, x)
    (g_general,) = torch.autograd.grad(general, x)
    torch.testing.assert_close(fast, general, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_fast, g_general, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda e: loss(e, y, **refs), (x,))


# -------------------------------------------------------------------------------- indices and references


@pytest.mark.parametrize("case", [c for c in CASES if c != "npair"])  # n-pair's default is the strict N-pair batch
def test_all_pairs_indices_equal_labels(case):
    """Passing every pair explicitly (pairs, or all triplets) gives the same loss as no indices."""
    loss = build(case)
    x, y = batch(n_classes=3, per_class=3, dim=4, seed=20)
    same = y[:, None] == y[None, :]
    a1, p = torch.where(same & ~torch.eye(9, dtype=torch.bool))
    a2, n = torch.where(~same)
    torch.testing.assert_close(loss(x, y, (a1, p, a2, n)), loss(x, y), rtol=1e-5, atol=1e-6)


PAIR_REDUCED = ("npair", "margin_per_class", "margin", "triplet", "triplet_soft", "contrastive", "contrastive_cosine")


@pytest.mark.parametrize("case", [c for c in CASES if c not in PAIR_REDUCED])  # the others: test_refs_concatenate
def test_refs_equal_to_batch_minus_self(case):
    """A loss against references = the batch with the anchor itself removed equals the in-batch loss,
    anchor by anchor (each anchor i gets refs = batch without i); for losses reduced per anchor."""
    loss = build(case)
    x, y = batch(n_classes=3, per_class=3, dim=4, seed=21)
    per_anchor = []
    for i in range(9):
        keep = torch.arange(9) != i
        per_anchor.append(loss(x[i : i + 1], y[i : i + 1], ref_embeddings=x[keep], ref_labels=y[keep]))
    torch.testing.assert_close(torch.stack(per_anchor).mean(), loss(x, y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_refs_concatenate(case):
    """The batch as references of itself, with self-pairs excluded via indices, equals the plain loss."""
    loss = build(case)
    x, y = batch(n_classes=3, per_class=3, dim=4, seed=22)
    same = y[:, None] == y[None, :]
    a1, p = torch.where(same & ~torch.eye(9, dtype=torch.bool))
    a2, n = torch.where(~same)
    with_refs = loss(x, y, (a1, p, a2, n), ref_embeddings=x.clone(), ref_labels=y.clone())
    if case == "npair":
        expected = loss(x, y, (a1, p, a2, n))
    else:
        expected = loss(x, y)
    torch.testing.assert_close(with_refs, expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ shared machinery


def _dense(pairs, n_refs):
    pos = torch.zeros(pairs.pos_w.shape[0], n_refs)
    pos.scatter_add_(1, pairs.pos_idx, pairs.pos_w)
    return pos, pairs.neg


@pytest.mark.parametrize("with_refs", [False, True])
def test_make_pairs_from_labels_brute_force(with_refs):
    from deepmetric.losses.base import make_pairs, prepare

    g = torch.Generator().manual_seed(23)
    y = torch.randint(0, 4, (11,), generator=g)
    ry = torch.randint(0, 5, (7,), generator=g) if with_refs else y
    x = torch.randn(11, 3)
    b = prepare(x, y, torch.randn(7, 3), ry) if with_refs else prepare(x, y)
    pos, neg = _dense(make_pairs(b, None), len(ry))
    for i in range(11):
        for j in range(len(ry)):
            self_pair = not with_refs and i == j
            assert pos[i, j] == float(y[i] == ry[j] and not self_pair)
            assert neg[i, j] == float(y[i] != ry[j])


def test_make_pairs_from_indices_dedup_and_multiplicity():
    from deepmetric.losses.base import make_pairs, prepare

    b = prepare(torch.randn(4, 2), torch.tensor([0, 0, 1, 1]))
    trip = (torch.tensor([0, 0, 0, 2]), torch.tensor([1, 1, 1, 3]), torch.tensor([2, 3, 2, 0]))
    pos, neg = _dense(make_pairs(b, trip), 4)
    assert pos[0, 1] == 1 and pos[2, 3] == 1 and pos.sum() == 2
    assert neg[0, 2] == 1 and neg[0, 3] == 1 and neg[2, 0] == 1 and neg.sum() == 3
    pos, neg = _dense(make_pairs(b, trip, multiplicity=True), 4)
    assert pos[0, 1] == 3 and neg[0, 2] == 2


def test_masked_logsumexp_bool_and_additive_masks():
    from deepmetric.losses.base import BIG, masked_logsumexp

    x = torch.tensor([[1.0, 2.0, 300.0], [5.0, -1.0, 0.5]], dtype=torch.float64, requires_grad=True)
    keep = torch.tensor([[True, True, False], [False, False, False]])
    out = masked_logsumexp(x, keep)
    assert out[0].item() == pytest.approx(math.log(math.e + math.e**2))
    assert out[1].item() == float("-inf")
    add = (keep.double() - 1) * BIG
    torch.testing.assert_close(masked_logsumexp(x, add), out)
    one = masked_logsumexp(x, keep, add_one=True)
    assert one[0].item() == pytest.approx(math.log(1 + math.e + math.e**2)) and one[1].item() == 0.0
    (out[0] + one.sum()).backward()
    assert torch.isfinite(x.grad).all() and (x.grad[0, 2] == 0) and (x.grad[1] == 0).all()
    cols = masked_logsumexp(x.detach(), keep, dim=0)
    assert cols[0].item() == pytest.approx(1.0) and cols[2].item() == float("-inf")


def test_take_matches_advanced_indexing_with_repeats():
    from deepmetric.losses.base import take

    m = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    rows, cols = torch.tensor([0, 4, 4, 2, 0, 4]), torch.tensor([6, 1, 1, 3, 6, 0])  # repeated pairs accumulate
    out = take(m, rows, cols)
    torch.testing.assert_close(out, m[rows, cols])
    w = torch.arange(1.0, 7.0, dtype=torch.float64)
    (got,) = torch.autograd.grad((out * w).sum(), m)
    (expected,) = torch.autograd.grad((m[rows, cols] * w).sum(), m)
    assert torch.equal(got, expected) and got[0, 6] == 1 + 5 and got[4, 1] == 2 + 3
    assert torch.autograd.gradcheck(lambda t: take(t, rows, cols), (m,))
    assert torch.autograd.gradgradcheck(lambda t: take(t, rows, cols), (m,))


def test_avg_nonzero_counts_the_positive_values():
    from deepmetric.losses.base import reduce

    values = torch.tensor([0.0, 2.0, 0.0, 1.0, 3.0], requires_grad=True)
    out = reduce(values, None, "avg_nonzero")
    assert out.item() == pytest.approx(2.0)
    out.backward()
    assert torch.equal(values.grad, torch.full((5,), 1 / 3))
    weights = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    assert reduce(values, weights, "avg_nonzero").item() == pytest.approx(1.0)  # only the 1.0 is kept and > 0
    assert reduce(torch.zeros(3), None, "avg_nonzero").item() == 0.0


def test_count_ones_past_float32_integers():
    from deepmetric.losses.base import count_ones

    assert count_ones(torch.tensor([1.0, 0.0, 1.0, 1.0])).item() == 3
    big = torch.ones((1 << 24) + 2)  # 2^24 + 2 is a float32 integer; counting one by one would stop at 2^24
    big[5] = 0.0
    big[-1] = 0.0
    assert count_ones(big).dtype == torch.float32 and count_ones(big).item() == 1 << 24
    big[5] = 1.0
    big[-1] = 1.0
    assert count_ones(big).item() == (1 << 24) + 2
