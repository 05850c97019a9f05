"""Deep ensembles (``model.members``): the model, the per-member loss, the config checks, training end to end."""

import math

import pytest
import torch
import torch.nn.functional as F

from deepmetric import losses
from deepmetric.errors import ConfigError, InputError
from deepmetric.losses.members import PerMemberLoss
from deepmetric.training import Trainer, load
from deepmetric.training.build import build_model
from deepmetric.training.objective import build_objective
from deepmetric.training.runfolder import read_records

SMALL = ["model.backbone_kwargs={width: 4}", "model.embedding_size=24", "model.members=3"]


def test_member_zero_is_the_single_model_and_the_embedding_is_the_scaled_concatenation():
    torch.manual_seed(0)
    ens = build_model(load(None, SMALL)).eval()
    torch.manual_seed(0)
    single = build_model(load(None, ["model.backbone_kwargs={width: 4}", "model.embedding_size=8"])).eval()
    x = torch.randn(5, 1, 8, 8)
    assert ens.backbone.num_features == 3 * single.backbone.num_features and ens.head.embedding_sizes == (8, 8, 8)
    for a, b in zip(single.state_dict().values(), [*ens.backbone[0].state_dict().values(),
                                                    *ens.head[0].state_dict().values()]):
        assert torch.equal(a, b)
    with torch.no_grad():
        e = ens(x)
        members = [h(b(x)) for b, h in zip(ens.backbone, ens.head)]
        raw, e2 = ens(x, return_raw=True)
    assert e.shape == (5, 24)
    torch.testing.assert_close(e, torch.cat(members, 1) / math.sqrt(3))
    torch.testing.assert_close(e[:, :8] * math.sqrt(3), single(x))
    torch.testing.assert_close(e.norm(dim=1), torch.ones(5))
    assert torch.equal(e, e2) and raw.shape == (5, 24)
    torch.testing.assert_close(F.normalize(raw[:, 8:16], dim=1), members[1])
    # the ensemble's cosine similarity is the mean of the members' cosines
    torch.testing.assert_close(e @ e.T, sum(m @ m.T for m in members) / 3)
    assert not torch.allclose(members[0], members[1])  # each member has its own initialisation


def test_per_member_loss_is_the_sum_of_independent_losses_and_keeps_members_apart():
    torch.manual_seed(1)
    copies = [losses.build("margin", num_classes=3) for _ in range(2)]
    per = PerMemberLoss(copies, [4, 4], math.sqrt(2))
    e = [F.normalize(torch.randn(12, 4, dtype=torch.float64), dim=1).requires_grad_(True) for _ in range(2)]
    y = torch.arange(3).repeat_interleave(4)
    value = per(torch.cat(e, 1) / math.sqrt(2), y)
    alone = [copies[i](e[i], y) for i in range(2)]
    torch.testing.assert_close(value, alone[0] + alone[1])
    assert set(per.last_parts) == {"member0", "member1"}
    torch.testing.assert_close(per.last_parts["member1"], alone[1].detach())
    (g0,) = torch.autograd.grad(value, e[0])
    (g0_alone,) = torch.autograd.grad(copies[0](e[0], y), e[0])
    torch.testing.assert_close(g0, g0_alone)  # member 0 gets exactly its own loss's gradient
    with pytest.raises(ConfigError, match="miner.name=null"):
        per(torch.cat(e, 1), y, indices=(y, y, y))
    with pytest.raises(InputError, match="8 = 4 \\+ 4"):  # embeddings of another size than the members'
        per(torch.randn(12, 6), y)


def test_objective_builds_one_loss_copy_per_member_with_its_own_proxies():
    cfg = load(None, SMALL + ["loss.name=proxy_anchor"])
    model = build_model(cfg)
    objective = build_objective(cfg, num_classes=5, num_samples=100, model=model)
    term = objective.terms["proxy_anchor"]
    assert isinstance(term, PerMemberLoss) and len(term.members) == 3
    assert {tuple(m.proxies.shape) for m in term.members} == {(5, 8)}
    assert term.members[0].proxies.data_ptr() != term.members[1].proxies.data_ptr()


@pytest.mark.parametrize("extra, match", [
    (["model.embedding_size=25"], "multiple of model.members"),
    (["miner.name=batch_hard", "loss.name=triplet"], "miner.name=batch_hard"),
    (["memory.size=64"], "memory.size=64"),
    (["augment.name=das"], "augment.name=das"),
    (["model.head=multi_head"], "model.head=linear"),
    (["model.pretrained=true", "model.head_kwargs={init: identity}"], "identical networks"),
    (["sampler.name=fixed_representatives"], "sampler.name=fixed_representatives"),
    (["proxies.ccp=true", "loss.name=proxy_anchor"], "proxies.ccp=True"),
    (["model.members=0"], "members"),
])
def test_settings_that_would_couple_the_members_are_refused(extra, match):
    with pytest.raises(ConfigError, match=match):
        load(None, SMALL + extra)


def test_an_ensemble_trains_with_validation_selection_and_logs_each_member(tmp_path, fast_overrides):
    cfg = load(None, fast_overrides + ["model.embedding_size=32", "model.members=2", "train.epochs=2",
                                       "data.val_classes=2", "sampler.batch_size=48"])
    summary = Trainer(cfg, tmp_path / "run", progress=False).fit()
    assert summary["selected"]["split"] == "val"
    last = read_records(tmp_path / "run")[-1]
    parts = [k for k in last if k.endswith(("member0", "member1"))]
    assert len(parts) == 2, sorted(last)
    html = (tmp_path / "run" / "report" / "report.html").read_text()
    assert "2 x small_cnn</b> (a deep ensemble, one loss per network), 32-d embedding" in html
