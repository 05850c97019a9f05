"""Embedding-space augmenters (DAS, IAA, Embedding Expansion, Proxy Synthesis, novel classes), the pair rules
they hand to the losses, and the synthetic classes they hand to proxy losses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deepmetric import augment, losses, miners
from deepmetric.augment import ClassMix, proxy_loss_with_classes
from deepmetric.augment.generative import interleaved
from deepmetric.augment.iaa import class_moments, correction_weight, merge_moments, neighbour_variance
from deepmetric.errors import ConfigError, LabelError
from deepmetric.pairing import PairRule, pair_indices
from deepmetric.training.config import load
from deepmetric.step import StepInputs
from deepmetric.training.objective import build_objective
from deepmetric.training.optim import param_groups

C, D = 4, 8


def batch(b=12, d=D, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(b, d, generator=g, dtype=dtype)
    return F.normalize(raw, dim=1), torch.arange(b) % C, raw


def make(name, **kw):
    params = augment.AUGMENTERS.parameters(name)
    filled = {k: v for k, v in {"num_classes": C, "embedding_size": D}.items() if k in params}
    return augment.build(name, **{**filled, **kw})


def fitted_iaa(**kw):
    """IAA with statistics estimated from a fixed pass."""
    iaa = make("iaa", **kw)
    _, y, raw = batch(40, seed=1)
    iaa.estimate(raw, y)
    return iaa


def step(emb, labels, out=None):
    n = emb.shape[0]
    kw = {} if out is None else {"pairs": out.pairs, "classes": out.classes}
    return StepInputs(embeddings=emb, labels=labels, raw=emb, inputs=emb, sample_ids=torch.arange(n),
                      is_synthetic=torch.zeros(n, dtype=torch.bool), model=torch.nn.Identity(), epoch=1, epochs=1, **kw)


# --------------------------------------------------------------------------------------- the contract

ALL = {
    "das": ({}, {"num_produce": 0}),
    "iaa": ({}, {"num_copies": 0}),
    "embedding_expansion": ({}, {"num_points": 0}),
    "proxy_synthesis": ({}, {"mu": 0.0}),
    "novel_classes": ({}, {"per_class": 0}),
}


def test_registry_keys():
    assert augment.available() == sorted(ALL)


@pytest.mark.parametrize("name", sorted(ALL))
def test_real_rows_first_unchanged_shapes_consistent_and_identity_when_disabled(name):
    torch.manual_seed(0)
    emb, y, raw = batch()
    aug = fitted_iaa() if name == "iaa" else make(name, **ALL[name][0])
    out = aug(emb, y, raw=raw)
    n = out.embeddings.shape[0]
    assert n > emb.shape[0] and out.labels.shape == out.is_synthetic.shape == (n,)
    assert torch.equal(out.embeddings[:12], emb) and torch.equal(out.labels[:12], y)
    assert not out.is_synthetic[:12].any() and out.is_synthetic[12:].all()
    assert out.embeddings.shape[1] == D and torch.isfinite(out.embeddings).all()
    if name in ("proxy_synthesis", "novel_classes"):
        assert out.classes is not None and (out.labels[12:] >= 0).all()
    else:  # copies keep the labels of the batch
        assert set(out.labels[12:].tolist()) <= set(y.tolist())
    off = (fitted_iaa if name == "iaa" else lambda **k: make(name, **k))(**ALL[name][1])
    same = off(emb, y, raw=raw)
    assert same.embeddings is emb and same.labels is y and not same.is_synthetic.any() and same.pairs is None


def test_from_config_fills_the_run_and_refuses_other_samplers():
    cfg = load(None, ["augment.name=das", "model.embedding_size=16", "model.normalize=false"])
    das = augment.from_config(cfg, num_classes=7)
    assert (das.num_classes, das.embedding_size, das.normalize) == (7, 16, False)
    assert augment.from_config(load(None, []), num_classes=7) is None
    cfg = load(None, ["augment.name=das", "sampler.name=fixed_representatives", "sampler.batch_size=8", "sampler.m=4"])
    with pytest.raises(ConfigError, match="m_per_class"):
        augment.from_config(cfg, num_classes=7)


def test_bad_labels_and_parameters_are_clear_errors():
    emb, y, _ = batch()
    with pytest.raises(LabelError, match=r"labels must lie in \[0, 4\)"):
        make("das")(emb, y + 2)
    with pytest.raises(ConfigError, match="scale_range"):
        make("das", scale_range=(2.0, 1.0))
    with pytest.raises(ConfigError, match="mu"):
        make("proxy_synthesis", mu=1.5)


# ----------------------------------------------------------------------------------------------- DAS


def test_das_frequency_matrix_and_bank_by_hand():
    emb = torch.tensor([[3.0, -5.0, 1.0], [0.0, 2.0, 1.0], [1.0, 1.0, 1.0], [-1.0, 0.0, 4.0]])
    y = torch.tensor([0, 0, 1, 0])
    das = augment.build("das", num_classes=2, embedding_size=3, num_scale=1, bank_size=4, normalize=False)
    das(emb, y)
    # top-1 signed entries: rows 0->0, 1->1, 2->(tie: topk picks one), 3->2
    assert das.frequency[0].tolist() == [1, 1, 1] and das.frequency[1].sum() == 1
    # class 0 has rows 0, 1, 3: 6 ordered differences, the newest 4 kept: (1,3), (3,0), (3,1) and (1,0)
    kept = {tuple(v) for v in das.bank[0].tolist()}
    expected = {tuple((emb[i] - emb[j]).tolist()) for i, j in [(1, 0), (1, 3), (3, 0), (3, 1)]}
    assert kept == expected and das.bank_count.tolist() == [4, 0] and das.bank_ptr.tolist() == [2, 0]
    das(emb[:2], y[:2])  # 2 more differences of class 0 overwrite the two oldest slots
    assert das.bank_count[0] == 4 and das.bank_ptr[0] == 0
    assert {tuple(v) for v in das.bank[0].tolist()} >= {tuple((emb[0] - emb[1]).tolist())}


def test_das_unit_scale_and_no_shift_gives_normalised_copies_and_detach_blocks_gradients():
    emb, y, raw = batch()
    x = raw.clone().requires_grad_()
    das = make("das", scale_range=(1.0, 1.0), shift=0.0, num_produce=2)
    out = das(x, y)
    torch.testing.assert_close(out.embeddings[12:], F.normalize(raw, dim=1).repeat(2, 1))
    out.embeddings[12:].sum().backward()
    assert x.grad.abs().sum() > 0
    x.grad = None
    make("das", detach=True)(x, y).embeddings[12:].sum().backward()
    assert not x.grad.any()


def test_das_scales_only_the_class_top_dimensions_within_the_range():
    torch.manual_seed(3)
    emb, y, _ = batch(b=400, d=D)
    das = make("das", shift=0.0, normalize=False, num_produce=3, num_scale=2, scale_range=(0.5, 2.0))
    out = das(emb, y)
    ratio = (out.embeddings[400:] / emb.repeat(3, 1)).view(3, 400, D)
    top = das.frequency[y].topk(2, dim=1).indices
    scaled = torch.zeros(400, D, dtype=torch.bool).scatter_(1, top, True).expand(3, -1, -1)
    assert torch.allclose(ratio[~scaled], torch.ones(())) and (ratio[scaled] >= 0.5).all() and (ratio[scaled] < 2).all()
    # U(0.5, 2): mean 1.25, variance 1.5²/12 (2400 draws; fixed seed)
    assert ratio[scaled].mean().item() == pytest.approx(1.25, abs=0.03)
    assert ratio[scaled].var().item() == pytest.approx(1.5**2 / 12, rel=0.08)


def test_das_shift_is_beta_times_a_bank_entry_of_the_class():
    torch.manual_seed(0)
    emb, y, _ = batch()
    das = make("das", scale_range=(1.0, 1.0), shift=0.5, normalize=False, num_produce=2)
    out = das(emb, y)
    shifts = (out.embeddings[12:] - emb.repeat(2, 1)) / 0.5
    for row, label in zip(shifts, y.repeat(2)):
        bank = das.bank[label, : das.bank_count[label]]
        assert torch.isclose(bank, row).all(1).any()


def test_das_gradcheck_float64():
    emb, y, _ = batch(b=6, dtype=torch.float64)

    def f(x):
        torch.manual_seed(0)
        return make("das", num_produce=2, shift=0.0).double()(x, y).embeddings  # the bank entries are detached

    assert torch.autograd.gradcheck(f, (emb.clone().requires_grad_(),))


# ----------------------------------------------------------------------------------------------- IAA


def test_iaa_estimator_from_zero_equals_numpy_and_unclamped_merge_is_pooled():
    _, y, raw = batch(40, seed=1)
    n, mean, var = class_moments(raw.double(), y, C)
    for c in range(C):
        rows = raw[y == c].double().numpy()
        np.testing.assert_allclose(mean[c].numpy(), rows.mean(0), rtol=1e-10)
        np.testing.assert_allclose(var[c].numpy(), rows.var(0), rtol=1e-10)
    iaa = make("iaa")
    iaa.estimate(raw, y)
    torch.testing.assert_close(iaa.variance, var.float())
    torch.testing.assert_close(iaa.mean, mean.float())
    a, b = raw[:16].double(), raw[16:].double()
    s1, s2 = class_moments(a, y[:16], C), class_moments(b, y[16:], C)
    zero = torch.zeros(C, D, dtype=torch.float64)
    m1, v1, n1 = merge_moments(zero, zero, torch.zeros(C, dtype=torch.float64), *s1)
    m2, v2, n2 = merge_moments(m1, v1, n1, *s2)  # unclamped: the pooled statistics of a and b
    for got, want in ((m2, mean), (v2, var), (n2, n)):
        torch.testing.assert_close(got, want)
    _, v_clamped, _ = merge_moments(m1, v1, n1, *s2, min_weight=0.8)
    w = 0.8  # class sizes 4 then 6: n'/(n+n') = 0.6, clamped to 0.8
    expected = (1 - w) * v1 + w * s2[2] + w * (1 - w) * (m1 - s2[1]) ** 2
    torch.testing.assert_close(v_clamped, expected)


def test_iaa_correction_weight_and_neighbours_by_hand():
    alpha = correction_weight(torch.tensor([2.0, 40.0, 41.0]))
    assert alpha.tolist() == pytest.approx([1 / (1 + math.log(1.1)), 1 / (1 + math.log(4.9)), 0.0])
    mean = torch.tensor([[0.0], [1.0], [3.0], [10.0]])
    var = torch.tensor([[1.0], [2.0], [4.0], [8.0]])
    count = torch.tensor([5.0, 5.0, 5.0, 1.0])  # class 3 is a singleton: never a neighbour
    nb, glob = neighbour_variance(mean, var, count, k=1)
    assert glob.item() == pytest.approx((5 * 1 + 5 * 2 + 5 * 4) / 15)
    # nearest by squared means (0, 1, 9, 100): 0 -> 1, 1 -> 0, 2 -> 1, 3 -> 2 (never itself)
    assert nb[:, 0].tolist() == [2.0, 1.0, 2.0, 4.0]
    nb2, _ = neighbour_variance(mean, var, count, k=2)
    # class 0's candidates 1, 2: d_mean (1, 9) and d_var (1, 3) min-max -> (0, 1): weights 5, 5·e^{-1}
    w = torch.tensor([5.0, 5.0 * math.exp(-1.0)])
    assert nb2[0, 0].item() == pytest.approx(((w * torch.tensor([2.0, 4.0])).sum() / w.sum()).item())


def test_iaa_synthetic_spread_is_lambda_times_the_class_variance():
    torch.manual_seed(0)
    iaa = make("iaa", lam=0.6, num_copies=3, normalize=False)
    var = torch.tensor([0.25, 1.0, 4.0, 0.01])[:, None].expand(C, D).contiguous()
    iaa.generation_variance.copy_(var)
    iaa.amount.fill_(10)
    raw = torch.randn(800, D)
    y = torch.arange(800) % C
    out = iaa(F.normalize(raw, dim=1), y, raw=raw)
    noise = (out.embeddings[800:] - raw.repeat(3, 1)).view(3, 800, D)
    for c in range(C):
        observed = noise[:, y == c].reshape(-1, D).var(0).mean().item()  # 4800 draws per class
        assert observed == pytest.approx(0.6 * var[c, 0].item(), rel=0.06)
    iaa.lam = 0.0
    torch.testing.assert_close(iaa(F.normalize(raw, dim=1), y, raw=raw).embeddings[800:], raw.repeat(3, 1))


def test_iaa_public_code_flag_reapplies_the_square_root_and_skips_the_correction():
    torch.manual_seed(0)
    iaa = fitted_iaa(public_code=True, normalize=False, lam=1.0)
    torch.testing.assert_close(iaa.generation_variance, iaa.variance)
    iaa.generation_variance.fill_(16.0)
    raw = torch.zeros(3000, D)
    y = torch.arange(3000) % C
    out = iaa(raw, y, raw=raw).embeddings[3000:].view(3, 3000, D)
    stds = out.reshape(3, -1).std(1)  # 16^(1/2), 16^(1/4), 16^(1/8)
    assert stds.tolist() == pytest.approx([4.0, 2.0, 2 ** 0.5], rel=0.03)
    paper = fitted_iaa()  # few samples per class: the correction mixes in the neighbours
    assert not torch.allclose(paper.generation_variance, paper.variance)


def test_iaa_before_any_estimate_is_the_identity_and_anchors_are_real_without_own_copies():
    emb, y, raw = batch()
    assert make("iaa")(emb, y, raw=raw).embeddings is emb
    out = fitted_iaa(num_copies=2)(emb, y, raw=raw)
    a_rows, r_rows = out.pairs.rows(36, emb.device)
    assert a_rows.tolist() == list(range(12)) and r_rows.tolist() == list(range(36))
    a1, p, a2, n = pair_indices(None, out.embeddings, out.labels, out.pairs)
    pos = {(int(a), int(q)) for a, q in zip(a1, p)}
    assert (0, 12) not in pos and (0, 24) not in pos  # its own copies
    assert (0, 16) in pos and (0, 4) in pos  # a copy of another sample of class 0, and a real one
    assert {(int(a), int(q)) for a, q in zip(a2, n)} == {(a, r) for a in range(12) for r in range(36) if a % C != r % C}


def test_iaa_gradcheck_float64():
    iaa = fitted_iaa().double()
    emb, y, raw = batch(b=6, dtype=torch.float64)

    def f(r):
        torch.manual_seed(0)
        return iaa(F.normalize(r, dim=1), y, raw=r).embeddings

    assert torch.autograd.gradcheck(f, (raw.clone().requires_grad_(),))


# ---------------------------------------------------------------------------- pair rules in the losses


@pytest.mark.parametrize("loss_name", ["contrastive", "triplet", "multi_similarity", "supcon", "ntxent", "circle"])
def test_a_rule_admitting_every_pair_reproduces_the_plain_loss(loss_name):
    emb, y, _ = batch(seed=2)
    emb = emb.double()
    cfg = load(None, [f"loss.name={loss_name}"])
    objective = build_objective(cfg, num_classes=C, num_samples=12, model=torch.nn.Identity())
    rule = PairRule()
    plain, _ = objective(step(emb, y))
    s = step(emb, y)
    s.pairs, s.indices = rule, pair_indices(None, emb, y, rule)
    ruled, _ = objective(s)
    assert ruled.item() == pytest.approx(plain.item(), rel=1e-9)


def test_embedding_expansion_points_hphn_roles_and_triplets_by_hand():
    emb, y, _ = batch(b=8)
    ee = make("embedding_expansion", num_points=2, normalize=False)
    out = ee(emb, y)
    # 4 classes x 1 pair (rows c, c+4), 2 points each at 1/3 and 2/3
    assert out.embeddings.shape[0] == 8 + 8
    torch.testing.assert_close(out.embeddings[8:12], emb[:4] * 2 / 3 + emb[4:] / 3)
    torch.testing.assert_close(out.embeddings[12:], emb[:4] / 3 + emb[4:] * 2 / 3)
    assert torch.allclose(make("embedding_expansion")(emb, y).embeddings[8:].norm(dim=1), torch.ones(()))
    # no miner: triplets with real anchors and positives, negatives among real and synthetic rows
    s = step(out.embeddings, out.labels, out)
    s.indices = pair_indices(None, out.embeddings, out.labels, out.pairs)
    objective = build_objective(load(None, ["loss.name=triplet"]), num_classes=C, num_samples=8, model=torch.nn.Identity())
    value, _ = objective(s)
    x, lab = out.embeddings, out.labels
    d = torch.cdist(F.normalize(x, dim=1), F.normalize(x, dim=1)) ** 2
    terms = [F.relu(d[a, p] - d[a, n] + 0.2) for a in range(8) for p in range(8) for n in range(16)
             if p != a and lab[p] == lab[a] and lab[n] != lab[a]]
    assert value.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
    # HPHN with batch-hard mining: positive real, hardest negative over every row
    a, p, n = pair_indices(miners.build("batch_hard"), x, lab, out.pairs)
    assert (p < 8).all() and set(a.tolist()) <= set(range(8))
    for ai, ni in zip(a.tolist(), n.tolist()):
        assert ni == int((d[ai] + (lab == lab[ai]) * 1e9).argmin())


# ------------------------------------------------------------------------------------ synthetic classes


def test_proxy_synthesis_mixes_consecutive_rows_of_different_classes():
    torch.manual_seed(0)
    emb, y, _ = batch()  # labels 0 1 2 3 0 1 2 3 ...
    order = interleaved(y)
    assert (y[order] != y[order.roll(1)]).all()
    assert torch.equal(interleaved(torch.tensor([5, 2, 9])), torch.arange(3))  # distinct labels: batch order
    ps = make("proxy_synthesis", mu=0.5, normalize=False)
    out = ps(emb, y)
    s = 6
    assert out.labels[12:].tolist() == list(range(C, C + s))
    lam = out.classes.weight[0]
    first, second = order[:s], order.roll(1)[:s]
    torch.testing.assert_close(out.embeddings[12:], lam * emb[first] + (1 - lam) * emb[second])
    assert torch.equal(out.classes.first, y[first]) and torch.equal(out.classes.second, y[second])


def test_proxy_loss_with_classes_is_the_loss_over_mixed_proxies():
    torch.manual_seed(0)
    loss = losses.build("normalized_softmax", num_classes=C, embedding_size=D).double()
    emb, y, _ = batch(b=6, dtype=torch.float64)
    mix = ClassMix(torch.tensor([0, 2]), torch.tensor([1, 3]), torch.tensor([0.3, 0.8], dtype=torch.float64))
    labels = torch.tensor([0, 1, 4, 5, 2, 4])
    value = proxy_loss_with_classes(loss, emb, labels, mix)
    p = F.normalize(loss.proxies, dim=1)
    extra = torch.stack([0.3 * p[0] + 0.7 * p[1], 0.8 * p[2] + 0.2 * p[3]])
    logits = F.normalize(emb, dim=1) @ F.normalize(torch.cat([p, extra]), dim=1).T / 0.05
    assert value.item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-10)
    assert loss.num_classes == C
    value.backward()
    assert loss.proxies.grad[[0, 1, 2, 3]].abs().sum(1).gt(0).all()

    assert torch.autograd.gradcheck(lambda x: proxy_loss_with_classes(loss, x, labels, mix), (emb.clone().requires_grad_(),))
    with pytest.raises(ConfigError, match="per-class parameter 'bias'"):
        proxy_loss_with_classes(losses.build("cross_entropy", num_classes=C, embedding_size=D), emb.float(), labels, mix)


@pytest.mark.parametrize("loss_name", ["normalized_softmax", "proxy_anchor", "soft_triple"])
def test_proxy_synthesis_with_mu_zero_reproduces_the_base_loss_and_composes_with_proxy_losses(loss_name):
    torch.manual_seed(0)
    emb, y, _ = batch()
    cfg = load(None, [f"loss.name={loss_name}", f"model.embedding_size={D}"])
    objective = build_objective(cfg, num_classes=C, num_samples=12, model=torch.nn.Identity())
    base = objective.terms[loss_name](emb, y)
    off = make("proxy_synthesis", mu=0.0)(emb, y)
    assert objective(step(off.embeddings, off.labels, off))[0].item() == pytest.approx(base.item())
    on = make("proxy_synthesis")(emb, y)
    value, _ = objective(step(on.embeddings, on.labels, on))
    assert torch.isfinite(value) and value.item() != pytest.approx(base.item())


def test_novel_classes_generator_is_trained_by_the_objective_in_its_own_group():
    torch.manual_seed(0)
    emb, y, _ = batch()
    nc = make("novel_classes", per_class=3, num_novel=5, lr_mult=0.5)
    out = nc(emb, y)
    assert out.embeddings.shape[0] == 12 + 3 * (C + 5)
    assert out.labels[12:].tolist() == (list(range(C)) + list(range(C, C + 5))) * 3
    assert (out.classes.first != out.classes.second).all() and out.classes.first.shape == (5,)
    assert torch.allclose(out.embeddings[12:].norm(dim=1), torch.ones(()))
    cfg = load(None, ["loss.name=proxy_anchor", f"model.embedding_size={D}"])
    objective = build_objective(cfg, num_classes=C, num_samples=12, model=torch.nn.Identity())
    value, _ = objective(step(out.embeddings, out.labels, out))
    value.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in nc.parameters())
    model = torch.nn.Module()
    model.backbone, model.head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    groups = {g["name"]: g for g in param_groups(model, objective, cfg.optimizer, nc)}
    assert groups["augmenter"]["lr"] == pytest.approx(cfg.optimizer.lr * 0.5)
    assert len(groups["augmenter"]["params"]) == len(list(nc.parameters()))
