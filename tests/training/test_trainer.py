"""End-to-end training on digits: learning happens, resume is exact, divergence and run folders are safe."""

import json

import pytest
import torch

from deepmetric.errors import ConfigError, RunFolderError, TrainingDivergedError
from deepmetric.training import Hook, Trainer, load
from deepmetric.training.runfolder import read_records




def test_seconds_long_run_beats_the_untrained_network(tmp_path):
    c = load(None, ["train.epochs=4", "eval.tsne=true", "eval.ks=[1,2,4,8]"])
    summary = Trainer(c, tmp_path / "run", progress=False).fit()
    untrained = summary["baselines"]["untrained network"]
    assert summary["test"]["recall@1"] > untrained["recall@1"]
    assert summary["test"]["map@r"] > untrained["map@r"] + 0.03
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints/last.pt",
                 "report/report.html", "report/loss.png", "report/metrics.png", "report/tsne.png"):
        assert (tmp_path / "run" / name).is_file(), name
    html = (tmp_path / "run" / "report" / "report.html").read_text()
    assert "no selection" in html and "map@r" in html
    records = read_records(tmp_path / "run")
    assert [r["epoch"] for r in records] == [0, 1, 2, 3, 4]
    assert summary["selected"] == {"split": "last", "metric": "map@r", "epoch": 4, "value": None}


class Interrupt(Hook):
    def __init__(self, at_epoch):
        self.at_epoch = at_epoch

    def on_epoch_start(self, trainer, epoch):
        if epoch == self.at_epoch:
            raise KeyboardInterrupt


@pytest.mark.parametrize("extra", [[], ["memory.size=100", "loss.name=contrastive", "miner.name=batch_hard"],
                                   ["objective=[{name: multi_similarity}, {name: sec, weight: 0.1}, {name: lsd, alpha: 50}]"],
                                   ["model.embedding_size=32", "model.members=2", "loss.name=proxy_anchor"]],
                         ids=["plain", "xbm+miner", "objective+lsd", "members"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, fast_overrides, extra):
    c = load(None, fast_overrides + ["train.epochs=3", "train.checkpoint_every=1"] + extra)
    full = Trainer(c, tmp_path / "full", progress=False)
    full.fit()
    with pytest.raises(KeyboardInterrupt):
        Trainer(c, tmp_path / "cut", hooks=[Interrupt(3)], progress=False).fit()
    resumed = Trainer(c, tmp_path / "cut", resume=True, progress=False)
    resumed.fit()
    a, b = read_records(tmp_path / "full"), read_records(tmp_path / "cut")
    assert [r["epoch"] for r in b] == [0, 1, 2, 3]
    for ra, rb in zip(a, b):
        assert ra.get("train/loss") == rb.get("train/loss")
        assert ra["test/map@r"] == rb["test/map@r"]
    for pa, pb in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(pa, pb)
    if "miner.name=batch_hard" in extra:
        assert len(resumed.memory) == 100 and torch.equal(full.memory.embeddings, resumed.memory.embeddings)


class Poison(Hook):
    def on_epoch_start(self, trainer, epoch):
        if epoch == 2:
            with torch.no_grad():
                trainer.model.head.linear.weight.fill_(float("nan"))


def test_nan_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path, fast_overrides):
    c = load(None, fast_overrides + ["train.epochs=3"])
    with pytest.raises(TrainingDivergedError, match="NaN/Inf at epoch 2.*last good checkpoint.*epoch 1"):
        Trainer(c, tmp_path / "run", hooks=[Poison()], progress=False).fit()
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_validation_split_selects_the_checkpoint(tmp_path, fast_overrides):
    c = load(None, fast_overrides + ["data.val_classes=2", "sampler.batch_size=48", "train.epochs=3"])
    trainer = Trainer(c, tmp_path / "run", progress=False)
    summary = trainer.fit()
    assert set(trainer.splits.val.labels.tolist()).isdisjoint(trainer.splits.train.labels.tolist())
    assert set(trainer.splits.test.labels.tolist()) == {5, 6, 7, 8, 9}
    sel = summary["selected"]
    assert sel["split"] == "val" and 1 <= sel["epoch"] <= 3
    records = read_records(tmp_path / "run")
    best = max((r for r in records if r["epoch"] > 0), key=lambda r: r["val/map@r"])
    assert sel["epoch"] == best["epoch"] and sel["value"] == best["val/map@r"]
    assert "VAL split" in (tmp_path / "run" / "report" / "report.html").read_text()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["selected"]["split"] == "val"


def test_select_on_test_is_flagged(tmp_path, fast_overrides):
    c = load(None, fast_overrides + ["train.select_on=test"])
    Trainer(c, tmp_path / "run", progress=False).fit()
    assert "WARNING: chosen on the test classes" in (tmp_path / "run" / "report" / "report.html").read_text()
    with pytest.raises(ConfigError, match="val_classes"):
        Trainer(load(None, fast_overrides + ["train.select_on=val"]), tmp_path / "other", progress=False)


def test_existing_run_folder_is_protected(tmp_path, fast_overrides):
    c = load(None, fast_overrides + ["train.epochs=1"])
    Trainer(c, tmp_path / "run", progress=False).fit()
    with pytest.raises(RunFolderError, match="--resume.*--overwrite"):
        Trainer(c, tmp_path / "run", progress=False)
    (tmp_path / "run" / "mine.txt").write_text("user file")
    Trainer(c, tmp_path / "run", overwrite=True, progress=False).fit()
    assert (tmp_path / "run" / "mine.txt").read_text() == "user file"
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "thesis.tex").write_text("x")
    with pytest.raises(RunFolderError, match="not a deepmetric run"):
        Trainer(c, tmp_path / "foreign", overwrite=True, progress=False)
    with pytest.raises(RunFolderError, match="no checkpoint"):
        Trainer(c, tmp_path / "nothing", resume=True, progress=False)


def test_lr_schedule_and_param_groups(fast_overrides, tmp_path):
    from deepmetric.training.config import ScheduleConfig
    from deepmetric.training.optim import lr_factor

    cos = ScheduleConfig(name="cosine", warmup_epochs=1)
    assert lr_factor(0, 100, 10, cos) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, cos) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, cos) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, cos) == pytest.approx(0.5, abs=1e-9)
    step = ScheduleConfig(name="step", step_epochs=2, gamma=0.5)
    assert [lr_factor(s, 100, 10, step) for s in (0, 19, 20, 45)] == [1, 1, 0.5, 0.25]
    c = load(None, fast_overrides + ["optimizer.head_lr_mult=10", "optimizer.name=sgd", "optimizer.grad_clip=1.0"])
    t = Trainer(c, tmp_path / "run", progress=False)
    lrs = {g["name"]: g["lr"] for g in t.optimizer.param_groups}
    assert lrs["head"] == pytest.approx(10 * lrs["backbone"])
    t.fit()
