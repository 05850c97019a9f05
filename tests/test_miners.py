"""Miners: mined tuples satisfy each miner's definition, checked against brute-force Python loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from deepmetric import losses, miners
from deepmetric.errors import InputError, LabelError, UnknownNameError
from deepmetric.miners import distance_weights


def batch(n_classes=5, per_class=4, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_classes).repeat_interleave(per_class)
    perm = torch.randperm(len(y), generator=g)
    return torch.randn(len(y), dim, generator=g), y[perm]


def sqdist(x, ref=None):
    x = F.normalize(x.double(), dim=1)
    ref = x if ref is None else F.normalize(ref.double(), dim=1)
    return torch.cdist(x, ref) ** 2


def as_set(t):
    return set(zip(*(v.tolist() for v in t)))


def test_registry():
    assert miners.available() == sorted(
        ["all_pairs", "all_triplets", "batch_hard", "semi_hard", "distance_weighted", "multi_similarity"]
    )
    with pytest.raises(UnknownNameError, match="semi_hard"):
        miners.build("semihard")


def test_all_pairs_and_triplets_brute_force():
    x, y = batch(n_classes=3, per_class=3)
    n = len(y)
    pairs = miners.build("all_pairs")(x, y)
    assert as_set(pairs[:2]) == {(a, p) for a in range(n) for p in range(n) if a != p and y[a] == y[p]}
    assert as_set(pairs[2:]) == {(a, q) for a in range(n) for q in range(n) if y[a] != y[q]}
    trip = miners.build("all_triplets")(x, y)
    expected = {(a, p, q) for a in range(n) for p in range(n) for q in range(n) if a != p and y[a] == y[p] != y[q]}
    assert len(trip[0]) == len(expected) and as_set(trip) == expected


@pytest.mark.parametrize("seed", [0, 1])
def test_batch_hard_brute_force(seed):
    x, y = batch(seed=seed)
    a, p, n = miners.build("batch_hard")(x, y)
    d = sqdist(x)
    expected = []
    for i in range(len(y)):
        ps = [j for j in range(len(y)) if j != i and y[j] == y[i]]
        ns = [j for j in range(len(y)) if y[j] != y[i]]
        expected.append((i, max(ps, key=lambda j: (d[i, j], -j)), min(ns, key=lambda j: (d[i, j], j))))
    assert list(zip(a.tolist(), p.tolist(), n.tolist())) == expected


def test_batch_hard_ties_lowest_index_and_no_positive():
    x = torch.tensor([[0.0], [1.0], [2.0], [-1.0], [-1.0]])  # 1-D: anchor 0; negatives 3 and 4 tie
    y = torch.tensor([0, 0, 2, 1, 1])
    a, p, n = miners.build("batch_hard", distance="euclidean", normalize=False)(x, y)
    row = dict(zip(a.tolist(), zip(p.tolist(), n.tolist())))
    assert row[0] == (1, 3)
    assert 2 not in row  # class 2 has no positive


def _semi_hard_facenet(d, y):
    out = set()
    for a in range(len(y)):
        ns = [j for j in range(len(y)) if y[j] != y[a]]
        for p in range(len(y)):
            if p == a or y[p] != y[a] or not ns:
                continue
            farther = [j for j in ns if d[a, j] > d[a, p]]
            q = min(farther, key=lambda j: (d[a, j], j)) if farther else max(ns, key=lambda j: (d[a, j], -j))
            out.add((a, p, q))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_semi_hard_facenet_brute_force(seed):
    x, y = batch(seed=seed)
    trip = miners.build("semi_hard")(x, y)
    assert as_set(trip) == _semi_hard_facenet(sqdist(x), y) and len(trip[0]) == len(as_set(trip))


def test_semi_hard_facenet_1d_toy():
    # anchor 0 at 0, positive at 1; negatives at 0.5 (harder), 1.5 (semi-hard, nearest farther), 3
    x = torch.tensor([[0.0], [1.0], [0.5], [1.5], [3.0]])
    y = torch.tensor([0, 0, 1, 2, 3])
    m = miners.build("semi_hard", distance="euclidean", normalize=False)
    trip = as_set(m(x, y))
    assert (0, 1, 3) in trip
    # no negative farther than the positive: fall back to the farthest negative
    x2 = torch.tensor([[0.0], [5.0], [0.5], [1.5], [3.0]])
    assert (0, 1, 4) in as_set(m(x2, y))


def test_semi_hard_all_brute_force_and_pml():
    x, y = batch(seed=3)
    trip = miners.build("semi_hard", convention="all", margin=0.5)(x, y)
    d = sqdist(x)
    n = len(y)
    expected = {
        (a, p, q)
        for a in range(n)
        for p in range(n)
        for q in range(n)
        if a != p and y[a] == y[p] != y[q] and d[a, p] < d[a, q] < d[a, p] + 0.5
    }
    assert as_set(trip) == expected and len(trip[0]) == len(expected)
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import distances as pd
    from pytorch_metric_learning import miners as pm

    pml = pm.TripletMarginMiner(margin=0.5, type_of_triplets="semihard", distance=pd.LpDistance(power=2))(x, y)
    assert as_set(pml) == expected


def test_semi_hard_roth_definition():
    torch.manual_seed(0)
    x, y = batch(seed=4)
    d = sqdist(x)
    a, p, n = miners.build("semi_hard", convention="roth", margin=0.3)(x, y)
    assert sorted(a.tolist()) == list(range(len(y)))  # one triplet per anchor
    for i, j, k in zip(a.tolist(), p.tolist(), n.tolist()):
        assert i != j and y[i] == y[j] != y[k]
        window = [q for q in range(len(y)) if y[q] != y[i] and d[i, j] < d[i, q] < d[i, j] + 0.3]
        if window:
            assert k in window


def test_semi_hard_rejects_unknown_convention():
    with pytest.raises(ValueError, match="convention"):
        miners.build("semi_hard", convention="tf")


def test_distance_weights_three_dims_inverse_distance():
    d = torch.tensor([[0.0, 0.6, 1.0, 1.2]])
    neg = torch.tensor([[False, True, True, True]])
    w = distance_weights(d, neg, dim=3)
    inv = torch.tensor([0.0, 1 / 0.6, 1 / 1.0, 1 / 1.2])
    torch.testing.assert_close(w[0], inv / inv.sum())


def test_distance_weights_high_dim_finite_and_cutoffs():
    x, y = batch(n_classes=16, per_class=4, dim=512, seed=5)
    d = torch.cdist(F.normalize(x, dim=1), F.normalize(x, dim=1))
    neg = y[:, None] != y[None, :]
    w = distance_weights(d, neg, dim=512)
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w.sum(1), torch.ones(len(y)))
    assert (w[~neg] == 0).all()
    # all beyond the nonzero-loss cutoff: uniform over negatives
    w_far = distance_weights(d, neg, dim=512, nonzero_loss_cutoff=0.1)
    torch.testing.assert_close(w_far, neg.float() / neg.sum(1, keepdim=True))


def test_distance_weighted_miner_definition_and_frequencies():
    torch.manual_seed(0)
    # one anchor, 1000 identical positives (1000 draws per call), negatives at angles 40°, 60°, 80°
    # (d = 0.68, 1.0, 1.29 < 1.4) and 120° (d = 1.73 ≥ 1.4: never drawn)
    angles = torch.tensor([0.0] * 1001 + [40.0, 60.0, 80.0, 120.0]) * math.pi / 180
    e = torch.stack([angles.cos(), angles.sin(), torch.zeros_like(angles)], 1)  # dim 3 -> w ∝ 1/d
    y = torch.tensor([0] * 1001 + [1, 2, 3, 4])
    m = miners.build("distance_weighted")
    counts = torch.zeros(4)
    for _ in range(100):
        a, p, n = m(e[:1], y[:1], ref_embeddings=e[1:], ref_labels=y[1:])
        assert (y[1:][p] == 0).all() and (y[1:][n] != 0).all() and len(a) == 1000
        counts += torch.bincount(n - 1000, minlength=4).float()
    assert counts[3] == 0
    d = 2 * torch.sin(torch.tensor([40.0, 60.0, 80.0]) * math.pi / 360)
    expected = (1 / d) / (1 / d).sum() * counts.sum()
    chi2 = float(((counts[:3] - expected) ** 2 / expected).sum())
    assert chi2 < 13.8  # χ² with 2 degrees of freedom, p = 0.001


def test_distance_weighted_brute_force_properties():
    torch.manual_seed(1)
    x, y = batch(n_classes=6, per_class=4, dim=16, seed=6)
    a, p, n = miners.build("distance_weighted")(x, y)
    pairs = [(i, j) for i in range(len(y)) for j in range(len(y)) if i != j and y[i] == y[j]]
    assert sorted(zip(a.tolist(), p.tolist())) == pairs  # one negative per (anchor, positive)
    assert (y[a] == y[p]).all() and (y[a] != y[n]).all()


def test_multi_similarity_miner_brute_force_and_pml():
    x, y = batch(seed=7)
    a1, p, a2, n = miners.build("multi_similarity")(x, y)
    s = F.normalize(x.double(), dim=1) @ F.normalize(x.double(), dim=1).T
    N = len(y)
    exp_pos, exp_neg = set(), set()
    for i in range(N):
        ps = [j for j in range(N) if j != i and y[j] == y[i]]
        ns = [j for j in range(N) if y[j] != y[i]]
        exp_neg |= {(i, j) for j in ns if s[i, j] + 0.1 > min(s[i, q] for q in ps)}
        exp_pos |= {(i, j) for j in ps if s[i, j] - 0.1 < max(s[i, q] for q in ns)}
    assert as_set((a1, p)) == exp_pos and as_set((a2, n)) == exp_neg
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import miners as pm

    pml = pm.MultiSimilarityMiner(0.1)(x, y)
    assert as_set(pml[:2]) == exp_pos and as_set(pml[2:]) == exp_neg


@pytest.mark.parametrize("name", ["all_pairs", "all_triplets", "batch_hard", "semi_hard", "distance_weighted", "multi_similarity"])
def test_miners_with_references_and_loss_compatibility(name):
    torch.manual_seed(2)
    x, y = batch(seed=8)
    ref, ry = batch(seed=9)
    idx = miners.build(name)(x, y, ref, ry)
    a, others = idx[0], idx[1:]
    assert a.max() < len(y) and all(o.max() < len(ry) for o in others)
    pos_ref = idx[1]
    assert (y[a] == ry[pos_ref]).all()
    assert (y[idx[-2 if len(idx) == 4 else 0]] != ry[idx[-1]]).all()
    for loss in ("contrastive", "triplet", "margin", "multi_similarity", "circle", "supcon", "ntxent"):
        out = losses.build(loss)(x, y, idx, ref_embeddings=ref, ref_labels=ry)
        assert torch.isfinite(out)


@pytest.mark.parametrize("name", ["batch_hard", "semi_hard", "distance_weighted", "multi_similarity", "all_pairs"])
def test_miners_degenerate_and_bad_input(name):
    m = miners.build(name)
    one_class = m(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    empty = one_class[2:] if name == "all_pairs" else one_class  # all_pairs still lists the positives
    assert all(t.numel() == 0 for t in empty)
    with pytest.raises(LabelError):
        m(torch.randn(4, 3), torch.zeros(4))
    with pytest.raises(InputError):
        m(torch.full((4, 3), float("nan")), torch.zeros(4, dtype=torch.long))


def test_miner_half_precision_and_no_grad():
    x, y = batch(seed=10)
    xh = x.half().requires_grad_(True)
    trip = miners.build("batch_hard")(xh, y)
    assert as_set(trip) == as_set(miners.build("batch_hard")(xh.detach().float(), y))
    assert all(not t.requires_grad for t in trip)


@pytest.mark.parametrize("name", ["batch_hard", "semi_hard", "multi_similarity"])
def test_mining_inside_an_autocast_region_is_the_float32_mining(name):
    x, y = batch(n_classes=8, per_class=4, dim=64, seed=5)
    miner = miners.build(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = miner(x, y)
    assert all(torch.equal(a, b) for a, b in zip(inside, miner(x, y)))
