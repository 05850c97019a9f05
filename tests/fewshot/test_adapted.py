"""Training on the k-shot target data: adapted embeddings, the stopping rule, weight transfer."""

import pytest
import torch
from torch import nn

from deepmetric import losses
from deepmetric.errors import ConfigError
from deepmetric.fewshot.adapted import StoppingRule, adapt_embedding, fit_target
from deepmetric.fewshot.config import TargetFit, WeightTransferConfig
from deepmetric.fewshot.prototypes import loo_knn_accuracy
from deepmetric.fewshot.weight_transfer import weight_transfer
from deepmetric.models import EmbeddingHead, EmbeddingModel
from deepmetric.training.objective import Objective


def _model(seed=0):
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU())
    return EmbeddingModel(backbone, EmbeddingHead(16, 8))


def _support(seed=1, n=4, k=5):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n).repeat_interleave(k)
    return torch.randn(n, 10, generator=g)[y] + 0.5 * torch.randn(n * k, 10, generator=g), y


def _objective(name="multi_similarity"):
    return Objective({name: losses.build(name)}, {name: 1.0})


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_zero_steps_give_the_source_embedding():
    model, (x, y) = _model(), _support()
    for accuracy in (None, loo_knn_accuracy):
        result = adapt_embedding(model, x, y, _objective(), TargetFit(max_epochs=0), accuracy)
        assert result.model is not model and result.epoch == 0 and result.epochs_run == 0
        assert _same(result.model, model)
        torch.testing.assert_close(result.model.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_adaptation_leaves_the_source_alone_and_head_mode_trains_only_the_last_linear():
    model, (x, y) = _model(), _support()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = adapt_embedding(model, x, y, _objective(), TargetFit(max_epochs=3, lr=1e-2, params="head"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    changed = {k for k, v in result.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"head.linear.weight", "head.linear.bias"}  # BatchNorm statistics untouched too
    everything = adapt_embedding(model, x, y, _objective(), TargetFit(max_epochs=3, lr=1e-2, params="all"))
    assert {"backbone.0.weight", "head.linear.weight"} <= {
        k for k, v in everything.model.state_dict().items() if not torch.equal(v, before[k])}
    with pytest.raises(ConfigError, match="head.linear"):
        adapt_embedding(nn.Linear(10, 8), x, y, _objective(), TargetFit(max_epochs=1, params="head"))


def test_stopping_rule_by_hand():
    rule = StoppingRule(patience=2, min_gain=0.1)
    steps = [rule.update(e, a) for e, a in enumerate([0.5, 0.6, 0.62, 0.64, 0.64, 0.9], start=1)]
    # epoch 2: gain 0.6 over 0 -> go on (reference 0.6); epoch 4: 0.64 - 0.6 < 0.1 * 0.6 -> stop
    assert [s[1] for s in steps[:4]] == [False, False, False, True]
    assert [s[0] for s in steps[:5]] == [True, True, True, True, False]  # ties are not improvements
    assert rule.best_epoch == 6 and rule.best == 0.9


def test_fit_target_restores_the_best_epoch():
    model = nn.Linear(2, 1, bias=False)
    scripted = iter([0.2, 0.5, 0.4, 0.4, 0.9])
    snapshots = []

    def loss_fn(x, y, ids, epoch):
        return model.weight.sum()  # every step moves the weight by -lr (Adam's first step ~ lr)

    def accuracy():
        snapshots.append(model.weight.detach().clone())
        return next(scripted)

    cfg = TargetFit(max_epochs=10, patience=2, min_gain=0.5, lr=0.1, batch_size=8)
    result = fit_target(model, model.parameters(), torch.zeros(4, 2), torch.zeros(4, dtype=torch.long),
                        loss_fn, cfg, accuracy)
    # checks at epochs 2 (0.5 > 0: go on) and 4 (0.5 - 0.5 < 0.25: stop); best = epoch 2
    assert result.epochs_run == 4 and result.epoch == 2 and result.train_accuracy == [0.2, 0.5, 0.4, 0.4]
    torch.testing.assert_close(model.weight, snapshots[1])
    assert not torch.equal(snapshots[1], snapshots[3])


def test_weight_transfer_new_head_fits_the_support_set():
    body, (x, y) = _model(), _support(n=3, k=4)
    before = {k: v.clone() for k, v in body.state_dict().items()}
    result = weight_transfer(body, x, y, 3, WeightTransferConfig(lr=1e-2, patience=5, max_epochs=60))
    assert result.model.output.out_features == 3 and result.model(x).shape == (12, 3)
    assert result.train_accuracy[result.epoch - 1] == max(result.train_accuracy) == 1.0
    assert all(torch.equal(v, body.state_dict()[k]) for k, v in before.items())  # source untouched
    assert not _same(result.model.body, body)  # all weights were fine-tuned
    normal = weight_transfer(body, x, y, 3, WeightTransferConfig(max_epochs=0, head_init="normal"), seed=3)
    assert normal.model.output.weight.std() > 0.5 and torch.equal(normal.model.output.bias, torch.zeros(3))
