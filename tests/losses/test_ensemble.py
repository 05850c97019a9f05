"""The ensemble of losses with learnable weights (deepmetric.losses.ensemble)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deepmetric import losses
from deepmetric.errors import ConfigError
from deepmetric.training import Trainer
from deepmetric.training.config import load

MEMBERS = ["multi_similarity", {"name": "triplet", "margin": 0.3}, "proxy_anchor"]


def batch(seed=0, n=12, d=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.arange(n) % 4


def build(**kwargs):
    torch.manual_seed(0)
    return losses.build("ensemble", losses=MEMBERS, num_classes=4, embedding_size=8, **kwargs)


def test_formula_by_hand_with_cumulative_means():
    loss = build(prior=[1, 2, 3], eta=1.0)
    m = 3
    w0 = torch.tensor([1, 2, 3]) / 6
    assert torch.allclose(loss.weights, w0) and loss.floor == 1 / (4 * m)
    with torch.no_grad():
        loss.c.copy_(torch.tensor([0.5, 0.1, 0.2]))  # Σw ≠ 1: the penalty is on
    w = torch.tensor([0.25, 0.01, 0.04]) + 1 / 12
    history = []
    for seed in range(3):  # a hand sequence of three steps
        x, y = batch(seed)
        values = torch.stack([member(x, y) for member in loss.members]).detach()
        history.append(values.double())
        means = torch.stack(history).mean(0)  # the cumulative mean, this step included
        scale = means.mean() / means
        expected = (w * scale.float() * values).sum() + 100 * 1.0 * (w.sum() - 1) ** 2
        assert loss(x, y).item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(loss.means, torch.stack(history).mean(0)) and int(loss.steps) == 3


def test_sum_penalty_is_zero_when_the_weights_sum_to_one():
    loss = build()
    x, y = batch()
    values = [member(x, y) for member in loss.members]
    # first step: L̄_k = L_k, so each term is w_k·L̄ and the total is L̄ when Σw = 1
    assert loss(x, y).item() == pytest.approx(torch.stack(values).mean().item(), rel=1e-5)


def test_weights_receive_gradients_and_stay_valid():
    loss = build()
    opt = torch.optim.Adam(loss.parameters(), lr=0.05)  # the paper: Adam; the 10⁴ penalty is stiff for SGD
    x, y = batch()
    for _ in range(20):
        opt.zero_grad()
        out = loss(x, y)
        out.backward()
        assert loss.c.grad is not None and loss.c.grad.abs().sum() > 0
        opt.step()
        assert bool((loss.weights >= 1 / 12).all())
    with torch.no_grad():
        loss.c.zero_()  # the floor is reached at c = 0, never crossed
    assert torch.allclose(loss.weights, torch.full((3,), 1 / 12))


def test_running_means_live_in_the_state_dict():
    loss = build()
    loss(*batch(0))
    loss(*batch(1))
    state = loss.state_dict()
    assert {"means", "steps", "c"} <= set(state) and int(state["steps"]) == 2
    fresh = build()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.means, loss.means)
    # evaluation mode does not move the means
    fresh.eval()
    fresh(*batch(2))
    assert torch.equal(fresh.means, loss.means) and int(fresh.steps) == 2


def test_split_heads_give_each_loss_its_head_and_set_the_evaluation_weights():
    from deepmetric.training.build import build_model

    model = build_model(load(None, ["model.head=multi_head", "model.backbone_kwargs={pool: none, width: 8}",
                                    "model.embedding_size=24", "model.head_kwargs={global_heads: 3, parts: 0}"]))
    loss = losses.build("ensemble", losses=MEMBERS, num_classes=4, embedding_size=24, model=model,
                        split_heads=True, prior=[2, 1, 3])
    assert loss.sizes == [8, 8, 8] and loss.members[2].embedding_size == 8
    x = torch.randn(12, 1, 8, 8)
    y = torch.arange(12) % 4
    emb = model(x)
    values = loss.member_losses(emb, y)
    heads = [F.normalize(h, dim=1) for h in emb.split(8, dim=1)]
    assert values[0].item() == pytest.approx(losses.build("multi_similarity")(heads[0], y).item(), rel=1e-6)
    loss(emb, y).backward()
    assert torch.allclose(model.head.head_weights, loss.weights.detach())
    grads = [h[0].weight.grad.abs().sum() for h in model.head.heads]
    assert all(g > 0 for g in grads)
    with pytest.raises(ConfigError, match="global_heads: 3"):
        losses.build("ensemble", losses=MEMBERS, num_classes=4, embedding_size=24, split_heads=True,
                     model=build_model(load(None, ["model.embedding_size=24"])))


def test_diversity_term_by_hand():
    loss = losses.build("ensemble", losses=["multi_similarity", "triplet"], embedding_size=4, split_heads=True,
                        diversity=1.0)
    e = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, -1]])  # heads: same vector for row 0, opposite for row 1
    assert loss._diversity(e, torch.tensor([0, 1])).item() == pytest.approx(2 - (0 + 2) / 2)


def test_errors():
    with pytest.raises(ConfigError, match="at least two"):
        losses.build("ensemble", losses=["triplet"])
    with pytest.raises(ConfigError, match="below the floor"):
        losses.build("ensemble", losses=["triplet", "contrastive"], prior=[1, 100])
    with pytest.raises(ConfigError, match="needs a name"):
        losses.build("ensemble", losses=["triplet", {"margin": 1}])


def test_gradcheck_float64():
    loss = build().double()
    loss(*[t.double() if t.is_floating_point() else t for t in batch(0)])  # one step: means set
    loss.eval()
    x, y = batch(1)
    x = x.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: loss(t, y), (x,))


def test_trains_on_digits_and_checkpoints_its_state(tmp_path, fast_overrides):
    cfg = load(None, fast_overrides + ["loss.name=ensemble", "loss.losses=[multi_similarity, proxy_anchor, triplet]"])
    trainer = Trainer(cfg, tmp_path, progress=False)
    trainer.fit()
    ensemble = trainer.objective.terms["ensemble"]
    assert int(ensemble.steps) == 8
    saved = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)["objective"]
    assert torch.equal(saved["terms.ensemble.means"].cpu(), ensemble.means.cpu())
