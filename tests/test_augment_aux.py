"""DAS's ``aux_loss``: every loss on the real rows alone plus ``aux_weight`` × on real ∪ produced rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deepmetric import augment, losses, miners
from deepmetric.errors import ConfigError
from deepmetric.training import Hook, Trainer, load
from deepmetric.training.config import check_components
from deepmetric.step import StepInputs
from deepmetric.training.objective import build_objective
from deepmetric.training.runfolder import read_records

C, D, B = 4, 8, 12
OBJECTIVE = "objective=[{name: multi_similarity}, {name: sec, weight: 0.1}]"


def das_step(**das_kw):
    """A DAS-augmented step as the trainer builds it (multi-similarity miner), with the augmenter and miner."""
    torch.manual_seed(0)
    raw = torch.randn(B, D)
    emb, y = F.normalize(raw, dim=1), torch.arange(B) % C
    das = augment.build("das", num_classes=C, embedding_size=D, num_produce=2, **das_kw)
    out = das(emb, y, raw=raw)
    miner = miners.build("multi_similarity")
    step = StepInputs(embeddings=out.embeddings, labels=out.labels, raw=raw, inputs=raw, sample_ids=torch.arange(B),
                      is_synthetic=out.is_synthetic, model=torch.nn.Identity(), epoch=1, epochs=1,
                      indices=miner(out.embeddings, out.labels))
    objective = build_objective(load(None, ["miner.name=multi_similarity", OBJECTIVE]), num_classes=C,
                                num_samples=B, model=torch.nn.Identity())
    return das, miner, step, objective


@pytest.mark.parametrize("aux_weight", [1.0, 0.5])
def test_aux_loss_is_the_loss_on_real_rows_plus_aux_weight_times_the_loss_on_all_rows(aux_weight):
    das, miner, step, objective = das_step(aux_loss=True, aux_weight=aux_weight)
    assert step.embeddings.shape[0] == 3 * B
    total, values = objective(step, step.real_rows(miner), das.aux_weight)
    ms = losses.build("multi_similarity")
    x, y = step.embeddings, step.labels
    real = ms(x[:B], y[:B], miner(x[:B], y[:B]))  # mined on the real rows alone
    both = ms(x, y, miner(x, y))
    assert set(values) == {"multi_similarity", "multi_similarity/real", "sec"}
    assert values["multi_similarity/real"].item() == pytest.approx(real.item(), rel=1e-6)
    assert values["multi_similarity"].item() == pytest.approx(both.item(), rel=1e-6)
    assert real.item() != pytest.approx(both.item(), rel=1e-3)  # the two parts differ
    # the regulariser is counted once, with its own weight
    expected = real + aux_weight * both + 0.1 * values["sec"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)


def test_real_rows_keep_the_first_b_rows_and_are_mined_on_their_own():
    _, miner, step, _ = das_step()
    real = step.real_rows(miner)
    assert torch.equal(real.embeddings, step.embeddings[:B]) and torch.equal(real.labels, step.labels[:B])
    assert not real.is_synthetic.any() and real.classes is None and real.pairs is None
    assert all(int(t.max()) < B for t in real.indices) and any(int(t.max()) >= B for t in step.indices)


def test_off_by_default_the_objective_is_unchanged():
    das, _, step, objective = das_step()
    assert das.aux_loss is False and augment.build("iaa", num_classes=C, embedding_size=D).aux_loss is False
    total, values = objective(step)
    ms = losses.build("multi_similarity")(step.embeddings, step.labels, step.indices)
    assert set(values) == {"multi_similarity", "sec"}
    assert total.item() == pytest.approx((ms + 0.1 * values["sec"]).item(), rel=1e-6)


@pytest.mark.parametrize("overrides, match", [
    (["augment.name=das", "augment.aux_lose=true"], "no parameter 'aux_lose'.*aux_loss"),
    (["augment.name=iaa", "augment.aux_loss=true"], "iaa.*no parameter 'aux_loss'"),
    (["augment.aux_loss=true"], "augment.name is not set"),
])
def test_config_keys_are_checked(overrides, match):
    with pytest.raises(ConfigError, match=match):
        check_components(load(None, overrides))


def test_negative_aux_weight_is_refused():
    with pytest.raises(ConfigError, match="aux_weight must be >= 0"):
        augment.from_config(load(None, ["augment.name=das", "augment.aux_loss=true", "augment.aux_weight=-1"]),
                            num_classes=C)


class Interrupt(Hook):
    def on_epoch_start(self, trainer, epoch):
        if epoch == 2:
            raise KeyboardInterrupt


def test_training_with_aux_loss_logs_both_parts_and_resumes_exactly(tmp_path, fast_overrides):
    c = load(None, fast_overrides + ["augment.name=das", "augment.aux_loss=true", "augment.aux_weight=0.5",
                                     "miner.name=multi_similarity", "train.checkpoint_every=1", "train.log_every=1"])
    full = Trainer(c, tmp_path / "full", progress=False)
    full.fit()
    steps = read_records(tmp_path / "full", log="steps.jsonl")
    assert len(steps) == 8
    for r in steps:  # the trainer's total is the real part plus aux_weight times the augmented part
        assert r["loss"] == pytest.approx(r["multi_similarity/real"] + 0.5 * r["multi_similarity"], rel=1e-5)
    with pytest.raises(KeyboardInterrupt):
        Trainer(c, tmp_path / "cut", hooks=[Interrupt()], progress=False).fit()
    resumed = Trainer(c, tmp_path / "cut", resume=True, progress=False)
    resumed.fit()
    a, b = read_records(tmp_path / "full"), read_records(tmp_path / "cut")
    assert [r["epoch"] for r in b] == [0, 1, 2]
    assert "train/loss/multi_similarity/real" in b[-1]
    for ra, rb in zip(a, b):
        assert ra.get("train/loss") == rb.get("train/loss")
        assert ra["test/map@r"] == rb["test/map@r"]
    for pa, pb in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(pa, pb)
    assert torch.equal(full.augmenter.bank, resumed.augmenter.bank)
