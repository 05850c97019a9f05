"""Tests of the ranking (average-precision) losses (deepmetric.losses.ranking)."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from deepmetric import losses, miners
from deepmetric.errors import ConfigError, InputError, LabelError
from deepmetric.losses import ranking
from deepmetric.losses.base import prepare
from deepmetric.losses.ranking import soprc_l1, soprc_l2, supap_step

KEYS = ("smooth_ap", "roadmap", "fast_ap", "auprc")


def build(name: str, num_classes: int = 4, num_samples: int = 64, **kw) -> torch.nn.Module:
    if name == "auprc":
        kw = {"num_classes": num_classes, "num_samples": num_samples, **kw}
    return losses.build(name, **kw)


def call(loss, x, y, ids=None, **kw):
    """``loss(x, y, ...)``, passing the sample ids the stochastic AUPRC loss needs in batch mode."""
    if isinstance(loss, ranking.StochasticAUPRCLoss) and "ref_embeddings" not in kw:
        kw["sample_ids"] = torch.arange(x.shape[0]) if ids is None else ids
    return loss(x, y, **kw)


def batch(n=12, d=6, classes=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.arange(n) % classes


def with_cosines(scores, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """A query ``[1, 0]`` and 2-D references whose cosine similarities to it are ``scores``."""
    s = torch.tensor(scores, dtype=dtype)
    return torch.tensor([[1.0, 0.0]], dtype=dtype), torch.stack([s, (1 - s**2).sqrt()], 1)


def exact_ap(sim: torch.Tensor, pos: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """Exact AP per query (no ties): mean over positives of (positives ranked at or above) / (items at or above)."""
    aps = []
    for s, p, o in zip(sim, pos, omega):
        s, p = s[o], p[o]
        order = torch.argsort(s, descending=True)
        hits = p[order].double().cumsum(0)
        ranks = torch.arange(1, len(s) + 1, dtype=torch.float64)
        aps.append((hits / ranks)[p[order]].mean())
    return torch.stack(aps)


def batch_ap(x, y, include_query=False) -> torch.Tensor:
    xn = F.normalize(x, dim=1)
    sim = xn @ xn.T
    same = y[:, None] == y[None, :]
    eye = torch.eye(len(y), dtype=torch.bool)
    omega = ~eye | include_query
    return exact_ap(sim, same & omega, omega)


# ------------------------------------------------------------------------------------------ all losses


def test_registered():
    assert set(KEYS) <= set(losses.available())


@pytest.mark.parametrize("name", KEYS)
def test_gradcheck_float64(name):
    x, y = batch(n=10, d=5)
    ref, ref_y = batch(n=7, d=5, seed=1)
    loss = build(name, tau2=1e-6) if name == "auprc" else build(name)  # τ₂ → 0: TPR̂ is locally constant
    loss.eval()  # no state update between gradcheck's evaluations
    x.requires_grad_(True)
    ref.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: loss(a, y), (x,))
    assert torch.autograd.gradcheck(lambda a, m: loss(a, y, ref_embeddings=m, ref_labels=ref_y), (x, ref))


@pytest.mark.parametrize("include_query", [False, True])
@pytest.mark.parametrize("name", ["smooth_ap", "roadmap"])
def test_gradcheck_include_query(name, include_query):
    x, y = batch(n=9, d=4)
    loss = build(name, include_query=include_query)
    assert torch.autograd.gradcheck(lambda a: loss(a, y), (x.requires_grad_(True),))


@pytest.mark.parametrize("name", KEYS)
def test_minimum_on_separated_batch_larger_when_shuffled(name):
    y = torch.arange(4).repeat_interleave(4)
    x = F.one_hot(y, 6).double()  # positives at s = 1, negatives at s = 0 (also the semi-variance's minimum)
    separated = call(build(name), x, y)
    shuffled = call(build(name), x, y[torch.randperm(16, generator=torch.Generator().manual_seed(1))])
    assert 0 <= float(separated) < 1e-6
    assert float(shuffled) > 0.2


@pytest.mark.parametrize("name", KEYS)
def test_chunked_equals_unchunked(name, monkeypatch):
    x, y = batch(n=14, d=5)
    x.requires_grad_(True)
    whole = call(build(name), x, y)
    (g_whole,) = torch.autograd.grad(whole, x)
    monkeypatch.setattr(ranking, "CHUNK_ELEMENTS", 1)  # chunks of B·R elements: B/K = 4 queries here
    loss = build(name)
    assert list(loss.ranking(prepare(x, y), None).chunks()) == [slice(i, i + 4) for i in range(0, 14, 4)]
    chunked = call(loss, x, y)
    (g_chunked,) = torch.autograd.grad(chunked, x)
    assert torch.allclose(whole, chunked, atol=1e-12) and torch.allclose(g_whole, g_chunked, atol=1e-12)


@pytest.mark.parametrize("name", KEYS)
def test_queries_without_positives_counted_never_nan(name):
    x, y = batch(n=9, d=4)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 4])  # class 2 and class 4 are singletons
    loss = build(name, num_classes=5)
    x.requires_grad_(True)
    out = call(loss, x, y)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(x.grad).all() and loss.queries_without_positives == 2
    x.grad = None
    alone = call(build(name, num_classes=9), x, torch.arange(9))  # no positive at all: 0, connected
    alone.backward()
    assert float(alone.detach()) == 0 and torch.count_nonzero(x.grad) == 0


@pytest.mark.parametrize("name", KEYS)
def test_half_precision_computed_in_float32(name):
    x, y = batch(n=12, d=8, dtype=torch.float32)
    full = call(build(name), x, y)
    half = call(build(name), x.half(), y)
    assert half.dtype == torch.float32 and torch.allclose(full, half, atol=2e-2)


@pytest.mark.parametrize("name", KEYS)
def test_all_pairs_indices_equal_labels(name):
    x, y = batch(n=12)
    by_labels = call(build(name), x, y)
    mined = call(build(name), x, y, indices=miners.build("all_pairs")(x, y))
    assert torch.allclose(by_labels, mined, atol=1e-12)


@pytest.mark.parametrize("name", KEYS)
def test_references_rank_queries_against_them(name):
    """Each query ranked against references = the rest of the batch gives the batch-mode loss (a mean
    over queries; equal |P| per query makes SOPRC's mean over pairs the same). Terms that average over
    pairs (ROADMAP's calibration, SOPRC's semi-variance) are off here."""
    x, y = batch(n=12, d=5)
    kw = {"calibration_weight": 0.0} if name == "roadmap" else {"variance_weight": 0.0} if name == "auprc" else {}
    loss = build(name, **kw)
    loss.eval()
    singles = [loss(x[i : i + 1], y[i : i + 1], ref_embeddings=torch.cat([x[:i], x[i + 1 :]]),
                    ref_labels=torch.cat([y[:i], y[i + 1 :]])) for i in range(12)]
    assert torch.allclose(torch.stack(singles).mean(), loss(x, y), atol=1e-12)


@pytest.mark.parametrize("name", KEYS)
def test_bad_input(name):
    loss = build(name)
    x, y = batch()
    with pytest.raises(InputError):
        call(loss, x[:, :, None], y)
    with pytest.raises(InputError):
        call(loss, x, y[:5])
    with pytest.raises(InputError):
        loss(x, y, ref_embeddings=x[:3, :2], ref_labels=y[:3])


# ------------------------------------------------------------------------------------------- Smooth-AP


def test_smooth_ap_converges_to_exact_ap():
    x, y = batch(n=16, d=6)
    ap = batch_ap(x, y).mean()
    gaps = [abs(1 - float(build("smooth_ap", tau=tau)(x, y)) - float(ap)) for tau in (0.1, 0.01, 1e-3, 1e-5, 1e-8)]
    assert gaps == sorted(gaps, reverse=True) and gaps[0] > 1e-3 and gaps[-1] < 1e-12


def test_smooth_ap_include_query_hand_rederivation_and_pml():
    from pytorch_metric_learning.losses import SmoothAPLoss

    x, y = batch(n=16, d=6)
    y = torch.arange(4).repeat_interleave(4)  # PML groups rows in blocks of (batch / classes): 4 x 4 only
    tau = 0.05
    xn = F.normalize(x, dim=1)
    sim = xn @ xn.T
    aps = []
    for q in range(16):  # official code: q is in Ω and in P; only the j = i term is removed
        pos = [i for i in range(16) if y[i] == y[q]]
        terms = []
        for i in pos:
            g = torch.sigmoid((sim[q] - sim[q, i]) / tau)
            g[i] = 0
            terms.append((1 + g[pos].sum()) / (1 + g.sum()))
        aps.append(torch.stack(terms).mean())
    expected = 1 - torch.stack(aps).mean()
    ours = build("smooth_ap", tau=tau, include_query=True)(x, y)
    assert torch.allclose(ours, expected, atol=1e-12)
    pml = SmoothAPLoss(temperature=tau)(x.float(), y)  # PML accumulates AP in float32
    assert torch.allclose(ours.float(), pml, atol=1e-6)
    assert 1 - float(build("smooth_ap", tau=1e-9, include_query=True)(x, y)) == pytest.approx(
        float(batch_ap(x, y, include_query=True).mean()), abs=1e-9)


def test_smooth_ap_hand_case():
    q, ref = with_cosines([0.9, 0.5, 0.7])  # positives 0.9, 0.5; negative 0.7
    tau = 0.1
    g = lambda t: 1 / (1 + math.exp(-t / tau))  # noqa: E731
    ap_09 = (1 + g(0.5 - 0.9)) / (1 + g(0.5 - 0.9) + g(0.7 - 0.9))
    ap_05 = (1 + g(0.9 - 0.5)) / (1 + g(0.9 - 0.5) + g(0.7 - 0.5))
    value = build("smooth_ap", tau=tau)(q, torch.tensor([0]), ref_embeddings=ref, ref_labels=torch.tensor([0, 0, 1]))
    assert float(value) == pytest.approx(1 - (ap_09 + ap_05) / 2, abs=1e-12)


# --------------------------------------------------------------------------------------------- ROADMAP


def test_supap_step_upper_bounds_the_step_and_offset_none_is_continuous():
    t = torch.linspace(-1, 1, 20001, dtype=torch.float64)
    value, _ = supap_step(t, 0.01, 100.0, 0.05, 1.44, 0.5)
    assert (value >= (t > 0).double()).all()
    loss = build("roadmap", offset=None)
    below, _ = supap_step(torch.tensor([0.05], dtype=torch.float64), loss.tau, loss.rho, loss.delta, loss.offset, 0.5)
    above, _ = supap_step(torch.tensor([0.05 + 1e-12], dtype=torch.float64), loss.tau, loss.rho, loss.delta,
                          loss.offset, 0.5)
    assert float(above - below) == pytest.approx(0, abs=1e-9) and loss.offset == pytest.approx(1.4933071, abs=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_roadmap_rank_surrogate_upper_bounds_the_true_rank(seed):
    x, y = batch(n=16, d=3, seed=seed)
    supap = build("roadmap", calibration_weight=0.0)
    r = supap.ranking(prepare(x, y), None)
    s = r.sim.detach()
    sp = s.gather(1, r.pos_idx)
    t = s[:, None, :] - sp[:, :, None]
    h, _ = supap_step(t, supap.tau, supap.rho, supap.delta, supap.offset, supap.start)
    true_rank = ((t >= 0).double() * (r.pos + r.neg)[:, None, :]).sum(2)  # k itself counted: rank ≥ 1
    surrogate = ((t >= 0).double() * r.pos[:, None, :]).sum(2) + (h * r.neg[:, None, :]).sum(2)
    assert (surrogate >= true_rank - 1e-12)[r.pos_w > 0].all()
    assert float(supap(x, y)) >= 1 - float(batch_ap(x, y).mean()) - 1e-12


def test_roadmap_hand_case():
    q, ref = with_cosines([0.95, 0.5, 0.97])  # positives 0.95, 0.5; negative 0.97
    loss = build("roadmap")
    sig = lambda t: 1 / (1 + math.exp(-t / 0.01))  # noqa: E731
    # positive 0.95: rank⁺ = 1, the negative is 0.02 above (0 < t ≤ δ): 0.5 + σ(2)
    # positive 0.5: rank⁺ = 2 (0.95 is above), the negative is 0.47 above (t > δ): 100·(0.47 − 0.05) + 1.44
    ap = (1 / (1 + 0.5 + sig(0.02)) + 2 / (2 + 100 * 0.42 + 1.44)) / 2
    calib = (0.9 - 0.5) + (0.97 - 0.6)  # non-zero terms: one positive (0.95 clears 0.9), one negative
    value = loss(q, torch.tensor([0]), ref_embeddings=ref, ref_labels=torch.tensor([0, 0, 1]))
    assert float(value) == pytest.approx(1 - ap + calib, abs=1e-9)


def test_roadmap_calibration_zero_when_scores_clear_the_margins():
    y = torch.arange(3).repeat_interleave(3)
    x = F.one_hot(y, 4).double() + 0.05 * torch.randn(9, 4, generator=torch.Generator().manual_seed(0))
    loss = build("roadmap")
    r = loss.ranking(prepare(x, y), None)
    assert float((r.sim * r.pos).max()) < 1 and float(r.sim[r.pos > 0].min()) > 0.9
    assert float(r.sim[r.neg > 0].max()) < 0.6 and float(loss.calibration(r)) == 0


def test_roadmap_positive_only_through_rank_plus_gets_no_gradient():
    """Positive j (s = 0.99) enters only rank⁺ of positive k (s = 0.5), an exact step: no gradient, while
    k and the negative just above it (s = 0.52) get one. j's own rank⁻ is flat (the negative is far below)."""
    q, ref = with_cosines([0.99, 0.5, 0.52])
    ref.requires_grad_(True)
    build("roadmap", calibration_weight=0.0)(q, torch.tensor([0]), ref_embeddings=ref,
                                             ref_labels=torch.tensor([0, 0, 1])).backward()
    norms = ref.grad.norm(dim=1)
    assert norms[0] < 1e-15 and norms[1] > 0.1 and norms[2] > 0.1


# --------------------------------------------------------------------------------------------- FastAP


def test_fast_ap_matches_pml():
    from pytorch_metric_learning.losses import FastAPLoss

    x, y = batch(n=24, d=6, classes=5)
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    ours, theirs = build("fast_ap")(a, y), FastAPLoss()(b, y)
    ours.backward()
    theirs.backward()
    assert torch.allclose(ours, theirs, atol=1e-10) and torch.allclose(a.grad, b.grad, atol=1e-10)


def test_fast_ap_hand_case_and_perfect_bins():
    # d² = 2 − 2s: positives at s = 0.95 (d² 0.1, bin centres 0 and 0.4: weights 0.75, 0.25) and s = 0.5 (d² 1,
    # bins 0.8 / 1.2: 0.5 each); negative at s = 0.7 (d² 0.6, bins 0.4 / 0.8: 0.5 each). L = 10.
    q, ref = with_cosines([0.95, 0.5, 0.7])
    h_pos = torch.tensor([0.75, 0.25, 0.5, 0.5, 0, 0, 0, 0, 0, 0, 0], dtype=torch.float64)
    h_all = h_pos + torch.tensor([0, 0.5, 0.5, 0, 0, 0, 0, 0, 0, 0, 0], dtype=torch.float64)
    cp, ca = h_pos.cumsum(0), h_all.cumsum(0)
    fast_ap = float((h_pos * cp / ca.clamp(min=1e-30)).sum() / 2)
    value = build("fast_ap")(q, torch.tensor([0]), ref_embeddings=ref, ref_labels=torch.tensor([0, 0, 1]))
    assert float(value) == pytest.approx(1 - fast_ap, abs=1e-9)
    q, ref = with_cosines([0.99, 0.9, 0.3, -0.2])  # positives in bins 0-1, negatives in bins 3-6
    assert float(build("fast_ap")(q, torch.tensor([0]), ref_embeddings=ref, ref_labels=torch.tensor([0, 0, 1, 1]))) \
        == pytest.approx(0, abs=1e-12)


# ---------------------------------------------------------------------------------- stochastic AUPRC


def test_soprc_surrogates():
    t = torch.tensor([0.0, 0.1, -0.1, 0.5, -1.0], dtype=torch.float64)
    l1, _ = soprc_l1(t, 0.1)
    assert l1.tolist() == pytest.approx([1, 0, 3, 0, 21])
    l2 = soprc_l2(torch.tensor([0.0, 1.0, -1.0, -0.001], dtype=torch.float64), 0.001)
    assert l2[:2].tolist() == [0, 0] and float(l2[2]) == pytest.approx(1) and 0.4 < float(l2[3]) < 0.5
    eps = 1e-7  # ℓ₁ is C¹ at 0: both one-sided slopes are −2/τ₁
    left, right = soprc_l1(torch.tensor([-eps, eps], dtype=torch.float64), 0.1)[0]
    assert float((right - 1) / eps) == pytest.approx(-20, rel=1e-4) and float((1 - left) / eps) == pytest.approx(-20)


def naive_soprc(loss, sim, labels, ref_labels, v, prior):
    """Official formulas, one query and positive at a time, with autograd: L = mean r/(1 + r)."""
    terms = []
    for q in range(sim.shape[0]):
        pos = [j for j in range(sim.shape[1]) if ref_labels[j] == labels[q]]
        neg = [j for j in range(sim.shape[1]) if ref_labels[j] != labels[q]]
        for k in pos:
            fpr = torch.stack([soprc_l1(sim[q, k] - sim[q, n], loss.tau1)[0] for n in neg]).mean()
            with torch.no_grad():
                tpr = (1 + soprc_l2(sim[q, k] - v[labels[q]], loss.tau2).sum()) / (loss.num_points + 1)
            ratio = (1 - prior[q]) / prior[q] * fpr / tpr
            terms.append(ratio / (1 + ratio))
    return torch.stack(terms).mean()


def test_auprc_matches_the_official_formulas_and_tpr_has_no_gradient():
    x, y = batch(n=6, d=4, classes=2)
    ref, ref_y = batch(n=9, d=4, classes=3, seed=3)
    loss = build("auprc", num_classes=3, num_samples=10, variance_weight=0.0)
    loss.v.uniform_(-0.5, 1, generator=torch.Generator().manual_seed(0))
    loss.sample_labels[:10] = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])  # counts 4, 2, 4
    xa = x.clone().requires_grad_(True)
    ours = loss(xa, y, ref_embeddings=ref, ref_labels=ref_y)
    ours.backward()
    xb = x.clone().requires_grad_(True)
    sim = F.normalize(xb, dim=1) @ F.normalize(ref, dim=1).T
    prior = 0.01 * torch.tensor([1.0, 0.5, 1.0], dtype=torch.float64)[y]
    expected = naive_soprc(loss, sim, y, ref_y, loss.v.double(), prior)
    expected.backward()
    assert torch.allclose(ours, expected, atol=1e-12) and torch.allclose(xa.grad, xb.grad, atol=1e-12)


def test_auprc_odds_estimate_unbiased_at_any_sampling_rate_unlike_smooth_ap():
    """Toy population for one query: 20 positive and 400 negative scores, prior π. The SOPRC odds
    r_k = (1 − π)/π·FPR̂_k/TPR̂_k (so that r/(1 + r) = 1 − precision) averaged over random batches equals
    its population value whether a batch samples 20 or 200 negatives; Smooth-AP's count-based batch AP
    moves with the sampling rate."""
    g = torch.Generator().manual_seed(0)
    pos_pop = 0.3 + 0.5 * torch.rand(20, generator=g, dtype=torch.float64)
    neg_pop = -0.2 + 0.8 * torch.rand(400, generator=g, dtype=torch.float64)
    loss = build("auprc", num_classes=2, num_samples=10, variance_weight=0.0)
    loss.eval()
    loss.v[0] = pos_pop.sort().values[torch.linspace(0, 19, 100).round().long()].float()
    labels = torch.tensor([0])

    def odds(pos, neg):
        q, ref = with_cosines(torch.cat([pos, neg]).tolist())
        ref_y = torch.cat([torch.zeros(len(pos)), torch.ones(len(neg))]).long()
        r = loss.ranking(prepare(q, labels, ref, ref_y), None)
        _, fpr, tpr, _ = loss.rates(r.sim.detach(), r, labels, slice(None))
        prior = loss.prior(labels).double()
        return ((1 - prior) / prior * fpr / tpr)[0], 1 - build("smooth_ap")(q, labels, ref_embeddings=ref, ref_labels=ref_y)

    population, _ = odds(pos_pop, neg_pop)
    smooth_means = []
    for n_neg in (20, 200):
        draws = [odds(pos_pop, neg_pop[torch.randperm(400, generator=g)[:n_neg]]) for _ in range(300)]
        est = torch.stack([d[0] for d in draws])  # [draws, 20 positives]
        se = est.std(0) / math.sqrt(len(draws))
        assert ((est.mean(0) - population).abs() <= 4 * se + 1e-12).all()
        smooth = torch.stack([d[1] for d in draws])
        smooth_means.append((smooth.mean(), smooth.std() / math.sqrt(len(draws))))
    (m20, s20), (m200, s200) = smooth_means
    assert m20 - m200 > 10 * (s20 + s200)


def test_auprc_duplicating_negatives_leaves_it_unchanged_unlike_smooth_ap():
    q, ref = with_cosines([0.9, 0.6, 0.2, 0.7, 0.4, -0.1])
    ref_y = torch.tensor([0, 0, 0, 1, 1, 1])
    dup, dup_y = torch.cat([ref, ref[3:]]), torch.cat([ref_y, ref_y[3:]])
    for name, changes in (("auprc", False), ("smooth_ap", True)):
        loss = build(name, num_classes=2)
        loss.eval()
        once = loss(q, torch.tensor([0]), ref_embeddings=ref, ref_labels=ref_y)
        twice = loss(q, torch.tensor([0]), ref_embeddings=dup, ref_labels=dup_y)
        assert (abs(float(once - twice)) > 1e-3) == changes


def naive_interpolation(scores: list[float], m: int) -> torch.Tensor:
    """The official ``v_left``/``v_right`` construction for one query's positive scores (≥ 2)."""
    s = sorted(scores)
    n, per = len(s), math.ceil(m / len(s))
    left = [max(2 * s[0] - s[1], -1)] + s[:-1]
    right = s[1:] + [min(2 * s[-1] - s[-2], 1)]
    points = [0.5 * ((s[i] - left[i]) * a / per + left[i] + (right[i] - s[i]) * a / per + s[i])
              for i in range(n) for a in range(per)]
    return torch.tensor(points[:m], dtype=torch.float64)


def test_auprc_state_update_with_beta_one_is_the_class_mean_interpolation():
    x, y = batch(n=8, d=5, classes=2)
    loss = build("auprc", num_classes=3, num_samples=20, beta=1.0, num_points=10)
    v0 = loss.v.clone()
    loss(x, y, sample_ids=torch.arange(8) + 5)
    sim = F.normalize(x, dim=1) @ F.normalize(x, dim=1).T
    for c in (0, 1):
        rows = (y == c).nonzero()[:, 0].tolist()
        expected = torch.stack([naive_interpolation([float(sim[q, j]) for j in rows if j != q], 10) for q in rows])
        assert torch.allclose(loss.v[c].double(), expected.mean(0), atol=1e-6)
    assert torch.equal(loss.v[2], v0[2])  # a class absent from the batch keeps its vector
    assert loss.sample_labels[5:13].tolist() == y.tolist() and (loss.sample_labels[:5] == -1).all()


def test_auprc_one_positive_and_ema():
    y = torch.tensor([0, 0, 1, 1, 1])
    x, _ = batch(n=5, d=3)
    loss = build("auprc", num_classes=2, num_samples=5, num_points=4)
    loss(x, y, sample_ids=torch.arange(5))
    s01 = float(F.cosine_similarity(x[0], x[1], dim=0))
    expected = 0.9 * torch.arange(4) / 4 + 0.1 * s01  # class 0: each query has one positive: constant
    assert torch.allclose(loss.v[0].double(), expected.double(), atol=1e-6)


def test_auprc_state_dict_round_trip():
    x, y = batch(n=16, d=5, classes=4)
    a = build("auprc", num_classes=4, num_samples=40)
    for step in range(3):
        a(x + 0.1 * step, y, sample_ids=torch.arange(16) + 4 * step)  # +4: same labels (y = i % 4)
    assert set(a.state_dict()) == {"v", "sample_labels"}
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = build("auprc", num_classes=4, num_samples=40)
    b.load_state_dict(torch.load(buffer))
    assert torch.equal(a.v, b.v) and torch.equal(a.sample_labels, b.sample_labels)
    assert not torch.equal(a.v, build("auprc", num_classes=4, num_samples=40).v)
    assert torch.equal(a(x, y, sample_ids=torch.arange(16)), b(x, y, sample_ids=torch.arange(16)))
    assert torch.equal(a.v, b.v)


def test_auprc_sample_ids_errors():
    x, y = batch(n=8, classes=4)
    loss = build("auprc", num_classes=4, num_samples=10)
    with pytest.raises(InputError, match="sample_ids"):
        loss(x, y)
    with pytest.raises(InputError, match=r"\[0, num_samples=10\)"):
        loss(x, y, sample_ids=torch.arange(8) + 5)
    with pytest.raises(InputError, match="1-D integer"):
        loss(x, y, sample_ids=torch.arange(8).float())
    with pytest.raises(InputError, match="1-D integer"):
        loss(x, y, sample_ids=torch.arange(7))
    loss(x, y, sample_ids=torch.arange(8))
    with pytest.raises(InputError, match="was seen with label"):
        loss(x, (y + 1) % 4, sample_ids=torch.arange(8))
    with pytest.raises(LabelError, match="num_classes=4"):
        loss(x, y + 1, sample_ids=torch.arange(8))
    loss.eval()  # evaluation and reference calls do not need sample ids
    assert torch.isfinite(loss(x, y)) and torch.isfinite(loss(x, y, ref_embeddings=x, ref_labels=y))


@pytest.mark.parametrize("name, kwargs", [
    ("smooth_ap", {"tau": 0}), ("roadmap", {"tau": -1}), ("fast_ap", {"num_bins": 0}),
    ("auprc", {"num_classes": 0, "num_samples": 5}), ("auprc", {"num_classes": 2, "num_samples": 5, "beta": 0}),
])
def test_bad_hyper_parameters(name, kwargs):
    with pytest.raises(ConfigError):
        losses.build(name, **kwargs)


# ------------------------------------------------------------------------------------------- training


def test_training_through_the_config_with_state_and_memory(tmp_path, fast_overrides):
    from deepmetric.training import Trainer, load

    c = load(None, fast_overrides + ["loss.name=auprc", "memory.size=64"])
    trainer = Trainer(c, tmp_path / "auprc", progress=False)
    trainer.fit()
    loss = trainer.objective.terms["auprc"]
    assert loss.num_samples == len(trainer.splits.train) and loss.num_classes == 5
    initial = torch.arange(loss.num_points, device=loss.v.device) / loss.num_points
    assert int((loss.sample_labels >= 0).sum()) > 100 and not torch.allclose(loss.v, initial.expand_as(loss.v))
    saved = torch.load(tmp_path / "auprc" / "checkpoints" / "last.pt", weights_only=False)["objective"]
    assert torch.equal(saved["terms.auprc.v"].cpu(), loss.v.cpu())
    assert torch.equal(saved["terms.auprc.sample_labels"].cpu(), loss.sample_labels.cpu())
    c = load(None, fast_overrides + ["loss.name=roadmap", "memory.size=64"])
    records = Trainer(c, tmp_path / "roadmap", progress=False).fit()
    assert math.isfinite(records["test"]["map@r"])
