"""Composed objectives: weighted terms, per-term logs, config checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deepmetric import losses
from deepmetric.errors import ConfigError, UnknownNameError
from deepmetric.regularizers import SphericalEmbeddingConstraint
from deepmetric.training import Trainer
from deepmetric.training.config import check_components, load
from deepmetric.step import StepInputs
from deepmetric.training.objective import Objective, build_objective
from deepmetric.training.runfolder import read_records

TERMS = "objective=[{name: multi_similarity}, {name: sec, weight: 0.5}]"


def make_step(n=12, d=8, epoch=2):
    torch.manual_seed(0)
    raw = torch.randn(n, d, requires_grad=True)
    return StepInputs(embeddings=F.normalize(raw, dim=1), labels=torch.arange(n) % 3, raw=raw, inputs=raw,
                      sample_ids=torch.arange(n), is_synthetic=torch.zeros(n, dtype=torch.bool),
                      model=torch.nn.Identity(), epoch=epoch, epochs=4)


def test_total_is_the_weighted_sum_of_the_terms():
    step = make_step()
    ms, sec = losses.build("multi_similarity"), SphericalEmbeddingConstraint()
    total, values = Objective({"multi_similarity": ms, "sec": sec}, {"multi_similarity": 1.0, "sec": 0.5})(step)
    expected_ms, expected_sec = ms(step.embeddings, step.labels), sec(step)
    assert values["multi_similarity"].item() == pytest.approx(expected_ms.item())
    assert values["sec"].item() == pytest.approx(expected_sec.item())
    assert total.item() == pytest.approx(expected_ms.item() + 0.5 * expected_sec.item())
    total.backward()
    assert step.raw.grad is not None


def test_lsd_with_zero_weight_equals_the_base_loss():
    cfg = load(None, ["objective=[{name: triplet}, {name: lsd, alpha: 0}]"])
    objective = build_objective(cfg, num_classes=3, num_samples=12, model=torch.nn.Identity())
    step = make_step(epoch=3)
    total, _ = objective(step)
    assert total.item() == pytest.approx(losses.build("triplet")(step.embeddings, step.labels).item())


def test_memory_and_miner_reach_pair_losses_but_not_proxy_losses():
    cfg = load(None, ["objective=[{name: proxy_anchor}, {name: contrastive, weight: 2}]", "miner.name=batch_hard",
                      "memory.size=32", "model.embedding_size=8"])
    objective = build_objective(cfg, num_classes=3, num_samples=12, model=torch.nn.Identity())
    step = make_step()
    step.indices = torch.tensor([0]), torch.tensor([3]), torch.tensor([1])
    mem_x, mem_y = F.normalize(torch.randn(5, 8), dim=1), torch.tensor([0, 1, 2, 0, 1])
    step.memory = mem_x, mem_y
    _, values = objective(step)
    c, pa = objective.terms["contrastive"], objective.terms["proxy_anchor"]
    expected = c(step.embeddings, step.labels, step.indices) + c(step.embeddings, step.labels, ref_embeddings=mem_x, ref_labels=mem_y)
    assert values["contrastive"].item() == pytest.approx(expected.item())
    assert values["proxy_anchor"].item() == pytest.approx(pa(step.embeddings, step.labels).item())


@pytest.mark.parametrize("overrides, message", [
    ([TERMS, "loss.name=triplet"], "either `loss` or `objective`"),
    (["objective=[{name: sec}, {name: sec}]"], "distinct names"),
    (["objective=[{name: sec}]"], "only regularisers"),
    (["objective=[{name: proxy_anchor}]", "miner.name=batch_hard"], "miner.name is set"),
    (["objective=[{name: multi_similarity}, {name: sec, momentun: 0.5}]"], "has no parameter 'momentun'"),
    (["objective=[{name: multi_similarity, weight: -1}]"], "greater than or equal to 0"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        cfg = load(None, overrides)
        check_components(cfg)
        build_objective(cfg, num_classes=3, num_samples=12, model=torch.nn.Identity())


def test_unknown_term_lists_losses_and_regularisers():
    with pytest.raises(UnknownNameError, match="Did you mean 'sec'.*regularisers: .*lsd"):
        check_components(load(None, ["objective=[{name: multi_similarity}, {name: secc}]"]))


def test_training_logs_every_term(tmp_path, fast_overrides):
    cfg = load(None, fast_overrides + [TERMS, "train.log_every=2"])
    assert cfg.method == "multi_similarity+sec"
    Trainer(cfg, tmp_path / "run", progress=False).fit()
    epochs = [r for r in read_records(tmp_path / "run") if r["epoch"] > 0]
    assert all({"train/loss/multi_similarity", "train/loss/sec"} <= set(r) for r in epochs)
    for r in epochs:
        assert r["train/loss"] == pytest.approx(r["train/loss/multi_similarity"] + 0.5 * r["train/loss/sec"], rel=1e-5)
    steps = read_records(tmp_path / "run", "steps.jsonl")
    assert [(s["epoch"], s["iteration"]) for s in steps] == [(1, 0), (1, 2), (2, 0), (2, 2)]
    assert all(s["loss"] == pytest.approx(s["multi_similarity"] + 0.5 * s["sec"], rel=1e-5) for s in steps)
    assert "multi_similarity" in (tmp_path / "run" / "report" / "report.html").read_text()


def test_parts_of_hybrid_and_ensemble_are_reported_but_not_summed():
    step = make_step(d=8)
    hybrid = losses.build("hybrid", num_classes=3, embedding_size=8, heads=2, lam=0.5)
    ensemble = losses.build("ensemble", losses=["multi_similarity", "triplet"], num_classes=3, embedding_size=8)
    total, values = Objective({"hybrid": hybrid, "ensemble": ensemble}, {"hybrid": 1.0, "ensemble": 2.0})(step)
    assert total.item() == pytest.approx(values["hybrid"].item() + 2 * values["ensemble"].item())
    x0, x1 = step.embeddings[:, :4], step.embeddings[:, 4:]
    for h, x in enumerate((x0, x1)):
        assert values[f"hybrid/proxy{h}"].item() == pytest.approx(hybrid.proxy[h](x, step.labels).item())
        assert values[f"hybrid/pair{h}"].item() == pytest.approx(hybrid.pair[h](x, step.labels).item())
    assert values["hybrid"].item() == pytest.approx(
        sum(values[f"hybrid/proxy{h}"].item() + 0.5 * values[f"hybrid/pair{h}"].item() for h in (0, 1)))
    assert values["ensemble/0_multi_similarity"].item() == pytest.approx(
        losses.build("multi_similarity")(step.embeddings, step.labels).item())
    assert values["ensemble/w0_multi_similarity"].item() == pytest.approx(0.5)  # uniform prior, m = 2
    assert not any(v.requires_grad for k, v in values.items() if "/" in k)


def test_training_logs_the_parts_of_a_composite_loss(tmp_path, fast_overrides):
    cfg = load(None, fast_overrides + ["loss.name=ensemble", "loss.losses=[multi_similarity, contrastive]"])
    Trainer(cfg, tmp_path / "run", progress=False).fit()
    epochs = [r for r in read_records(tmp_path / "run") if r["epoch"] > 0]
    keys = {"train/loss/ensemble", "train/loss/ensemble/0_multi_similarity", "train/loss/ensemble/1_contrastive",
            "train/loss/ensemble/w0_multi_similarity", "train/loss/ensemble/w1_contrastive"}
    assert all(keys <= set(r) for r in epochs)
    assert all(r["train/loss"] == pytest.approx(r["train/loss/ensemble"], rel=1e-6) for r in epochs)
