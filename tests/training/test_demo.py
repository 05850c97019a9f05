"""The digits demo: its configuration selects on held-out training classes, and its run states the
comparison with raw pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from deepmetric import data, evaluation
from deepmetric.cli import app
from deepmetric.training import Trainer, load
from deepmetric.training import grid as G
from deepmetric.training.build import build_model
from deepmetric.training.demo import DEMO
from deepmetric.training.report import comparison_text

ROOT = Path(__file__).resolve().parents[2]
QUICK = ["train.epochs=1", "train.iterations_per_epoch=2", "eval.tsne=false", "eval.ks=[1,2]"]


def test_demo_selects_on_held_out_training_classes(tmp_path):
    trainer = Trainer(load(None, DEMO), tmp_path / "run", progress=False)
    assert trainer.select_on == "val"
    train, val = set(trainer.splits.train.labels.tolist()), set(trainer.splits.val.labels.tolist())
    assert len(val) >= 2  # with one class every neighbour is correct: MAP@R = 1 and selects nothing
    assert not train & val and train | val == {0, 1, 2, 3, 4}  # test classes 5-9 never choose the checkpoint
    assert set(trainer.splits.test.labels.tolist()) == {5, 6, 7, 8, 9}


def test_the_demo_grid_runs_the_demo_settings():
    grid = G.make_grid(ROOT / "grids" / "digits_demo.yaml")
    assert grid.variants == {"previous_demo": [], "demo": DEMO}
    assert grid.baselines == {"previous_demo": "untrained", "demo": "untrained"}


def test_demo_networks_start_at_their_flattened_features():
    """The identity heads: the untrained demo embedding is each of the 3 networks' 512 features,
    L2-normalised, concatenated and scaled by 1/√3."""
    torch.manual_seed(0)
    model = build_model(load(None, DEMO)).eval()
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        features = [b(x) for b in model.backbone]
        assert [f.shape for f in features] == [(5, 512)] * 3
        expected = torch.cat([torch.nn.functional.normalize(f) for f in features], 1) / 3 ** 0.5
        assert torch.allclose(model(x), expected, atol=1e-6)


def test_comparison_text_gives_each_baseline_and_the_difference():
    summary = {"test": {"map@r": 0.7, "recall@1": 0.9},
               "baselines": {"raw pixels": {"map@r": 0.6125, "recall@1": 0.99}, "untrained network": {"map@r": 0.75},
                             "no such metric": {"nmi": 0.5}}}
    assert comparison_text(summary) == ("trained MAP@R 0.7000 vs raw pixels 0.6125 (+0.0875), "
                                        "untrained network 0.7500 (-0.0500)")
    assert comparison_text(summary, "recall@1") == "trained R@1 0.9000 vs raw pixels 0.9900 (-0.0900)"
    assert comparison_text({"test": {"map@r": 0.5}}) == "trained MAP@R 0.5000"


@pytest.mark.slow
def test_a_short_demo_states_the_raw_pixel_comparison(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), *[a for s in QUICK for a in ("--set", s)]])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    test = data.build("digits", split="test")
    raw = evaluation.evaluate(test.raw_features(), test.labels, ks=(1, 2))
    assert np.isclose(summary["baselines"]["raw pixels"]["map@r"], raw["map@r"])
    assert summary["selected"]["split"] == "val"
    sentence = comparison_text(summary)
    assert sentence.startswith(f"trained MAP@R {summary['test']['map@r']:.4f} vs raw pixels {raw['map@r']:.4f} (")
    assert sentence in (tmp_path / "report" / "report.html").read_text()
    assert sentence in " ".join(result.output.split()) and "VAL split" in result.output
