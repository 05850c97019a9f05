"""Tests of CCP-DML proxy re-placement (deepmetric.proxies)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from deepmetric import losses
from deepmetric.data.base import Subset
from deepmetric.errors import ConfigError
from deepmetric.proxies import CCPProxyReplacement, class_pool, kcenter, soft_normalize
from deepmetric.training import Hook, Trainer, load
from deepmetric.training.build import unaugmented
from deepmetric.inference import embed
from deepmetric.training.runfolder import read_records


def test_kcenter_picks_farthest_first_pool_members():
    # one class, 2-D pool; seed proxy at the origin
    pool = torch.tensor([[[0.1, 0.0], [3.0, 0.0], [0.0, 2.0], [2.9, 0.1], [-1.0, -1.0]]])
    valid = torch.ones(1, 5, dtype=torch.bool)
    picks = kcenter(pool, valid, torch.zeros(1, 1, 2), 3)
    # farthest from 0: (3, 0); then from {0, (3,0)}: (0, 2) (d² 4 vs (−1,−1): 2); then (−1, −1) (d² 2)
    assert picks.tolist() == [[1, 2, 4]]
    assert kcenter(pool, valid, torch.zeros(1, 0, 2), 2).tolist() == [[0, 1]]  # no seeds: first, then farthest
    # invalid (padding) rows are never picked; classes are independent
    two = torch.cat([pool, pool.flip(1)])
    mask = torch.tensor([[True, False, True, True, True], [True] * 5])
    assert kcenter(two, mask, torch.zeros(2, 1, 2), 1).tolist() == [[3], [3]]


def test_class_pool_draws_distinct_items_of_each_class():
    labels = np.array([0, 1, 0, 2, 1, 0, 0, 2, 1, 1, 1])
    idx, valid = class_pool(labels, 3, 3, torch.Generator().manual_seed(0))
    assert idx.shape == valid.shape == (3, 3)
    assert valid.tolist() == [[True] * 3, [True] * 3, [True, True, False]]
    for c in range(3):
        chosen = idx[c][valid[c]]
        assert (labels[chosen] == c).all() and len(set(chosen.tolist())) == len(chosen)
    again, _ = class_pool(labels, 3, 3, torch.Generator().manual_seed(0))
    assert np.array_equal(idx, again)


def test_soft_normalize():
    v = torch.tensor([[0.3, 0.4], [3.0, 4.0]])
    assert torch.allclose(soft_normalize(v), torch.tensor([[0.3, 0.4], [0.6, 0.8]]))


class CheckPlacement(Hook):
    """After each CCP re-placement (its on_epoch_end runs first), the proxies are the embeddings of the
    training samples (indices into the training split) the hook says it chose."""

    def __init__(self):
        self.checked, self.seen = 0, 1  # the initial placement happens before epoch 1

    def on_epoch_end(self, trainer, epoch, metrics):
        ccp = trainer.hooks[0]
        if ccp.placements == self.seen:  # no re-placement this epoch (the last one): the network moved on
            return
        self.seen = ccp.placements
        for name, loss in ccp.targets(trainer).items():
            chosen = ccp.chosen[name]
            clean = unaugmented(trainer.config, trainer.splits.train)  # digits: no random shifts
            emb, labels = embed(trainer.model, Subset(clean, chosen.numpy()), device=trainer.device)
            assert torch.allclose(loss.proxies.detach().cpu(), emb, atol=1e-6)
            k = loss.proxies_per_class
            assert (trainer.label_map[labels] == torch.arange(loss.num_classes).repeat_interleave(k)).all()
            self.checked += 1


@pytest.mark.parametrize("loss", ["proxy_anchor", "multi_proxy_anchor"])
def test_hook_places_proxies_on_the_chosen_embeddings_and_training_continues(tmp_path, fast_overrides, loss):
    c = load(None, fast_overrides + [f"loss.name={loss}", "proxies.ccp=true", "proxies.every=1", "proxies.pool=5"])
    check = CheckPlacement()
    trainer = Trainer(c, tmp_path / "run", hooks=[check], progress=False)
    assert isinstance(trainer.hooks[0], CCPProxyReplacement)
    summary = trainer.fit()
    ccp = trainer.hooks[0]
    assert ccp.placements == 2 and check.checked == 1  # before epoch 1, after epoch 1 (not after the last)
    assert np.isfinite(summary["test"]["map@r"])
    assert all(np.isfinite(r["train/loss"]) for r in read_records(tmp_path / "run") if r["epoch"] > 0)


def test_initial_placement_picks_the_largest_norm_pool_embedding():
    """Zero seeds: the first pick per class is its pool embedding with the largest (soft-normalised) norm."""
    pool = torch.tensor([[[0.1, 0.2], [0.5, 0.1], [0.3, 0.0]]])
    assert kcenter(soft_normalize(pool), torch.ones(1, 3, dtype=torch.bool), torch.zeros(1, 1, 2), 1).item() == 1


def fake_trainer(**kw):
    proxy = losses.build("proxy_anchor", num_classes=3, embedding_size=2)
    model = nn.Linear(2, 2)
    return SimpleNamespace(
        select_on="val", config=SimpleNamespace(train=SimpleNamespace(select_metric="map@r", epochs=100)),
        objective=nn.ModuleDict({"proxy_anchor": proxy}), model=model, **kw,
    )


class Recording(CCPProxyReplacement):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls = []

    def replace(self, trainer, seeded):
        self.calls.append((len(self.calls), seeded, {n: p.clone() for n, p in self.best_proxies.items()}))


def test_plateau_rule_replaces_after_patience_evaluations_without_improvement():
    hook = Recording(patience=3, min_delta=1e-5, proximal=2e-4)
    trainer = fake_trainer()
    at = []
    for epoch, value in enumerate([0.1, 0.2, 0.2, 0.2, 0.2, 0.2 + 5e-6, 0.3], start=1):
        before = len(hook.calls)
        hook.on_epoch_end(trainer, epoch, {"val/map@r": value, "epoch": epoch})
        if len(hook.calls) > before:
            at.append(epoch)
    assert at == [5]  # .1 .2 .2 .2 .2: the third evaluation without improvement
    assert hook.calls[0][1] is True  # seeded with the best proxies
    assert hook.lam == 2e-4 and hook.best == 0.3 and hook.stale == 0
    assert set(hook.anchor) == {"weight", "bias"}
    hook.on_epoch_end(trainer, 8, {"epoch": 8})  # no evaluation this epoch: nothing counted
    assert hook.stale == 0


def test_proximal_step_is_lr_lambda_theta_minus_anchor_and_never_moves_proxies():
    trainer = fake_trainer()
    opt = torch.optim.SGD([{"params": trainer.model.parameters(), "lr": 0.5}], lr=0.5)
    trainer.optimizer = opt
    hook = CCPProxyReplacement(proximal=0.1)
    hook.anchor = {n: torch.zeros_like(p) for n, p in trainer.model.named_parameters()}
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    proxies = trainer.objective["proxy_anchor"].proxies.detach().clone()
    hook.on_batch_end(trainer, 1, 0, 0.0)  # λ = 0 until the first plateau: nothing moves
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    hook.lam = 0.1
    hook.on_batch_end(trainer, 1, 1, 0.0)
    for n, p in trainer.model.named_parameters():
        assert torch.allclose(p, before[n] - 0.5 * 0.1 * (before[n] - 0.0))
    assert torch.equal(trainer.objective["proxy_anchor"].proxies, proxies)


class Interrupt(Hook):
    def on_epoch_start(self, trainer, epoch):
        if epoch == 3:
            raise KeyboardInterrupt


def test_resume_keeps_proxies_and_hook_state(tmp_path, fast_overrides):
    c = load(None, fast_overrides + [
        "train.epochs=3", "loss.name=proxy_anchor", "data.val_classes=2", "sampler.batch_size=48",
        "proxies.ccp=true", "proxies.patience=1", "proxies.min_delta=1.0", "proxies.pool=4",
    ])  # min_delta 1: only the first evaluation "improves", so every later one re-places (with λ > 0)
    full = Trainer(c, tmp_path / "full", progress=False)
    full.fit()
    with pytest.raises(KeyboardInterrupt):
        Trainer(c, tmp_path / "cut", hooks=[Interrupt()], progress=False).fit()
    resumed = Trainer(c, tmp_path / "cut", resume=True, progress=False)
    assert resumed.hooks[0].placements == 0
    resumed.fit()
    a, b = full.hooks[0], resumed.hooks[0]
    assert a.placements == b.placements == 2 and a.lam == b.lam == 2e-4  # initial + after epoch 2
    for name in a.chosen:
        assert torch.equal(a.chosen[name], b.chosen[name])
    for pa, pb in zip(full.objective.state_dict().values(), resumed.objective.state_dict().values()):
        assert torch.equal(pa, pb)
    for ra, rb in zip(read_records(tmp_path / "full"), read_records(tmp_path / "cut")):
        assert ra.get("train/loss") == rb.get("train/loss") and ra["val/map@r"] == rb["val/map@r"]


def test_configuration_errors(tmp_path, fast_overrides):
    with pytest.raises(ConfigError, match="val_classes.*proxies.every"):
        Trainer(load(None, fast_overrides + ["loss.name=proxy_anchor", "proxies.ccp=true"]), tmp_path / "a",
                progress=False).fit()
    with pytest.raises(ConfigError, match="proxy loss"):
        Trainer(load(None, fast_overrides + ["proxies.ccp=true", "proxies.every=1"]), tmp_path / "b",
                progress=False).fit()
    with pytest.raises(ConfigError, match="proxies.evry"):
        load(None, ["proxies.evry=2"])
