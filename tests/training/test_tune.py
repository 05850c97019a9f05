"""`deepmetric tune`: coordinate descent by short training runs on digits, recorded in a table."""

from __future__ import annotations

import csv

from typer.testing import CliRunner

from deepmetric.cli import app

runner = CliRunner()
TINY = ["loss.name=contrastive", "loss.reduction=mean_pos_neg", "data.val_classes=2", "sampler.batch_size=24",
        "sampler.m=8", "train.epochs=1",
        "train.iterations_per_epoch=2", "eval.tsne=false", "eval.ks=[1]", "model.backbone_kwargs={width: 8}"]


def _sets(items):
    return [a for s in items for a in ("--set", s)]


def test_tune_on_digits_records_every_run_and_reuses_them(tmp_path):
    args = ["tune", "--param", "loss.neg_weight=0.5,1,2", *_sets(TINY), "--out", str(tmp_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(tmp_path / "tune.csv")))
    # starts at the config's value (1), then tries both neighbours
    assert [float(r["loss.neg_weight"]) for r in rows][:1] == [1.0] and len(rows) == 3
    assert sum(r["best"] == "yes" for r in rows) == 1
    best = max(rows, key=lambda r: float(r["val MAP@R"]))
    assert best["best"] == "yes"
    for r in rows:
        assert (tmp_path / r["folder"] / "summary.json").is_file() and 0 <= float(r["test R@1"]) <= 1
    assert "| order | loss.neg_weight | val MAP@R |" in (tmp_path / "tune.md").read_text()
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and again.output.count("finished, reused") == 3


def test_tune_refuses_to_score_on_the_test_classes(tmp_path):
    sets = [s for s in TINY if not s.startswith("data.val_classes")]
    result = runner.invoke(app, ["tune", "--param", "loss.neg_weight=0.5,1", *_sets(sets), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "data.val_classes" in result.output
    bad = runner.invoke(app, ["tune", "--param", "loss.neg_weight=1", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "at least two values" in bad.output


def test_tune_searches_a_term_of_the_objective_list(tmp_path):
    sets = [s for s in TINY if not s.startswith("loss.")] + ["objective=[{name: contrastive}, {name: sec, weight: 0.5}]"]
    args = ["tune", "--param", "objective.1.weight=0.1,0.5", *_sets(sets), "--out", str(tmp_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(tmp_path / "tune.csv")))
    assert [float(r["objective.1.weight"]) for r in rows] == [0.5, 0.1]  # starts at the config's own weight
    for r in rows:
        saved = (tmp_path / r["folder"] / "config.yaml").read_text()
        assert f"weight: {float(r['objective.1.weight'])}" in saved
    bad = runner.invoke(app, ["tune", "--param", "objective.5.weight=0.1,0.5", *_sets(sets), "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "not an index" in bad.output
