"""Fixed-representative batches (Can et al. 2021), the proximal regulariser, and the augmenters and sampler
inside the trainer (exact resume)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepmetric import miners, regularizers, samplers
from deepmetric.errors import ConfigError
from deepmetric.pairing import pair_indices
from deepmetric.regularizers import ProximalRegularizer
from deepmetric.samplers import FixedRepresentativeSampler
from deepmetric.training import Hook, Trainer, load
from deepmetric.step import StepInputs
from deepmetric.training.objective import build_objective
from deepmetric.training.runfolder import read_records


def labels_of(sizes):
    return np.repeat(np.arange(len(sizes)), sizes)


def test_registry_and_default():
    assert samplers.SAMPLERS.available() == ["fixed_representatives", "m_per_class", "npair"]
    assert isinstance(samplers.from_config(load(None, []), labels_of([20] * 5)), samplers.MPerClassSampler)


def trainer_batches(sampler, epoch, n):
    """The first n batches of an epoch as the trainer draws them (more passes when the sampler is shorter)."""
    out, pass_ = [], 0
    while len(out) < n:
        sampler.set_epoch(epoch, pass_)
        out += list(sampler)
        pass_ += 1
    return out[:n]


@pytest.mark.parametrize("lifetime", [1, 3, 7])
def test_representatives_stay_for_exactly_lifetime_iterations_across_epochs(lifetime):
    labels = labels_of([6, 5, 9, 4])
    s = FixedRepresentativeSampler(labels, m=3, batch_size=12, seed=1, lifetime=lifetime, iterations_per_epoch=5)
    assert len(s) == 3  # 24 samples / (4 classes x 2): the trainer makes 5-iteration epochs from passes
    seen = []  # every batch holds all 4 classes: its first 4 rows are the representatives
    for epoch in range(1, 4):
        for batch in trainer_batches(s, epoch, 5):
            reps = batch[:4]
            assert sorted(labels[reps].tolist()) == [0, 1, 2, 3]
            seen.append(dict(zip(labels[reps].tolist(), reps)))
    first = 5  # global iteration of epoch 1, batch 0
    for k, reps in enumerate(seen):
        g = first + k
        same_as_prev = k > 0 and reps == seen[k - 1]
        assert same_as_prev == (k > 0 and g % lifetime != 0)  # changes exactly at lifetime boundaries


def test_batch_layout_and_the_samples_to_representatives_problem():
    labels = labels_of([10, 2, 7, 1, 8, 9])
    s = FixedRepresentativeSampler(labels, m=4, batch_size=12, seed=0, lifetime=4)
    for i, batch in enumerate(s):
        reps, p = s.representatives(i // 4), 3
        head, rest = batch[:p], np.array(batch[p:]).reshape(p, 3)
        classes = labels[head]
        assert len(set(classes.tolist())) == p and set(head) <= set(reps.tolist())
        for c, rep, others in zip(classes, head, rest):
            assert (labels[others] == c).all()
            assert rep not in others or (labels == c).sum() == 1  # a singleton repeats its representative
    emb = F.normalize(torch.randn(12, 5), dim=1)
    y = torch.as_tensor(labels[batch])
    rule = s.pair_rule(12, emb.device)
    a1, pos, a2, neg = pair_indices(None, emb, y, rule)
    assert len(a1) == 9 and len(a2) == 9 * 2  # one positive representative, P - 1 negative ones per sample
    a, p_, n = pair_indices(miners.build("batch_hard"), emb, y, rule)
    assert (y[3:][a] == y[:3][p_]).all() and (y[3:][a] != y[:3][n]).all()
    d = torch.cdist(emb[3:], emb[:3]) ** 2
    assert torch.equal(n, (d + (y[3:, None] == y[None, :3]) * 9.0).argmin(1)[a])  # hardest negative representative


def test_every_sample_appears_about_once_per_epoch_and_batches_are_seeded():
    labels = labels_of([12] * 6)
    a = FixedRepresentativeSampler(labels, m=4, batch_size=12, seed=3, lifetime=2)
    b = FixedRepresentativeSampler(labels, m=4, batch_size=12, seed=3, lifetime=2)
    assert list(a) == list(b)
    data = np.concatenate([np.array(x[3:]) for x in a])
    assert len(a) == 8 and len(data) == 72 and np.bincount(data, minlength=72).max() <= 2
    b.set_epoch(1)
    assert list(a) != list(b)


def test_mining_builds_batches_of_classes_with_near_representatives():
    labels = labels_of([5] * 6)
    s = FixedRepresentativeSampler(labels, m=2, batch_size=6, seed=0, lifetime=100, mining=True)
    directions = torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1.0], [0.1, 0.9], [-1.0, 0], [-0.9, -0.1]])
    for c in range(6):  # observe every class's representative once (3 per batch)
        reps = torch.as_tensor(s.representatives(0)[[c, (c + 1) % 6, (c + 2) % 6]])
        s.observe(reps, directions[[c, (c + 1) % 6, (c + 2) % 6]])
    near = {0: {1, 3}, 1: {0, 3}, 2: {3, 1}, 3: {2, 1}, 4: {5, 2}, 5: {4, 2}}  # the 2 largest cosines, by hand
    for batch in s:
        seed, *others = labels[batch[:3]].tolist()
        assert set(others) == near[seed]
    state = s.state_dict()
    t = FixedRepresentativeSampler(labels, m=2, batch_size=6, seed=0, lifetime=100, mining=True)
    t.load_state_dict(state)
    assert list(t) == list(s)


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="m >= 2"):
        FixedRepresentativeSampler(labels_of([4] * 4), m=1, batch_size=4)
    with pytest.raises(ConfigError, match="lifetime"):
        FixedRepresentativeSampler(labels_of([4] * 4), m=2, batch_size=4, lifetime=0)
    with pytest.raises(ConfigError, match="no parameter 'lifetme'"):
        Trainer(load(None, ["sampler.name=m_per_class", "sampler.lifetme=3"]), "unused", progress=False)


# --------------------------------------------------------------------------------- proximal regulariser


def prox_step(model):
    x = torch.zeros(2, 3)
    return StepInputs(embeddings=x, labels=torch.zeros(2, dtype=torch.long), raw=x, inputs=x,
                      sample_ids=torch.arange(2), is_synthetic=torch.zeros(2, dtype=torch.bool),
                      model=model, epoch=1, epochs=1)


def test_proximal_term_by_hand_and_anchor_refresh_every_lifetime():
    assert "proximal" in regularizers.available()
    model = nn.Linear(2, 1).double()
    reg = ProximalRegularizer(model, lifetime=2)
    assert reg(prox_step(model)).item() == 0.0  # step 0 takes the anchor
    theta0 = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        model.weight += torch.tensor([[0.5, -1.0]])
        model.bias += 2.0
    value = reg(prox_step(model))  # step 1: same lifetime
    assert value.item() == pytest.approx(0.5 * (0.25 + 1.0 + 4.0))
    value.backward()
    torch.testing.assert_close(model.weight.grad, model.weight.detach() - theta0[0])
    assert reg(prox_step(model)).item() == 0.0  # step 2: new lifetime, anchor = current weights
    reg.eval()
    with torch.no_grad():
        model.bias += 1.0
    assert reg(prox_step(model)).item() == pytest.approx(0.5) and int(reg.steps) == 3  # eval: no step counted


def test_proximal_takes_the_sampler_lifetime_and_needs_one():
    cfg = load(None, ["sampler.name=fixed_representatives", "sampler.lifetime=5", "sampler.batch_size=8", "sampler.m=4",
                      "objective=[{name: contrastive}, {name: proximal, weight: 0.01}]"])
    objective = build_objective(cfg, num_classes=5, num_samples=10, model=nn.Linear(2, 2))
    assert objective.terms["proximal"].lifetime == 5 and not list(
        p for p in objective.parameters() if p.requires_grad)
    with pytest.raises(ConfigError, match="proximal needs lifetime"):
        build_objective(load(None, ["objective=[{name: contrastive}, {name: proximal}]"]), num_classes=5,
                        num_samples=10, model=nn.Linear(2, 2))


# ------------------------------------------------------------------------------------- in the trainer


class Interrupt(Hook):
    def on_epoch_start(self, trainer, epoch):
        if epoch == 2:
            raise KeyboardInterrupt


RUNS = {
    "das": ["augment.name=das"],
    "iaa": ["augment.name=iaa", "augment.every=1"],
    "novel_classes": ["loss.name=proxy_anchor", "augment.name=novel_classes"],
    "fixed_representatives": ["sampler.name=fixed_representatives", "sampler.lifetime=3", "sampler.mining=true",
                              "sampler.m=4", "sampler.batch_size=20", "miner.name=batch_hard",
                              "objective=[{name: contrastive}, {name: proximal, weight: 0.01}]"],
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_resume_reproduces_the_uninterrupted_run(tmp_path, fast_overrides, name):
    c = load(None, fast_overrides + ["train.checkpoint_every=1", "train.iterations_per_epoch=3"] + RUNS[name])
    full = Trainer(c, tmp_path / "full", progress=False)
    full.fit()
    with pytest.raises(KeyboardInterrupt):
        Trainer(c, tmp_path / "cut", hooks=[Interrupt()], progress=False).fit()
    resumed = Trainer(c, tmp_path / "cut", resume=True, progress=False)
    resumed.fit()
    a, b = read_records(tmp_path / "full"), read_records(tmp_path / "cut")
    assert [r["train/loss"] for r in a[1:]] == [r["train/loss"] for r in b[1:]]
    for pa, pb in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(pa, pb)
    if full.augmenter is not None:
        for (k, va), vb in zip(full.augmenter.state_dict().items(), resumed.augmenter.state_dict().values()):
            assert torch.equal(va, vb), k
    else:
        np.testing.assert_array_equal(full.sampler.class_embeddings, resumed.sampler.class_embeddings)
    if name == "iaa":
        assert full.augmenter.amount.sum() > 0
