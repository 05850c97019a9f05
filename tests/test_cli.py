"""The command line, through typer's test runner."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from deepmetric.cli import app

runner = CliRunner()
FAST = ["--set", "train.epochs=1", "--set", "train.iterations_per_epoch=3", "--set", "eval.tsne=false"]


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("train", "evaluate", "list", "config", "demo"):
        assert cmd in result.output


@pytest.mark.parametrize("kind,expected", [
    ("losses", ["multi_similarity"]), ("datasets", ["digits"]), ("backbones", ["small_cnn"]), ("miners", ["name"]),
    ("augmenters", ["das", "iaa", "proxy_synthesis"]), ("samplers", ["m_per_class", "fixed_representatives"]),
    ("regularizers", ["sec", "lsd", "proximal", "[recon]"]),  # brackets of a description are not rich markup
    ("heads", ["linear", "multi_head"]), ("distances", ["cosine", "squared_euclidean"]),
])
def test_list(kind, expected):
    result = runner.invoke(app, ["list", kind])
    assert result.exit_code == 0 and all(e in result.output for e in expected)


def test_list_rejects_unknown_kind():
    result = runner.invoke(app, ["list", "optimisers"])
    assert result.exit_code != 0


def test_config_show_and_errors():
    result = runner.invoke(app, ["config", "show", "--set", "train.epochs=5"])
    assert result.exit_code == 0 and "epochs: 5" in result.output
    bad = runner.invoke(app, ["config", "show", "--set", "train.epoks=5"])
    assert bad.exit_code == 2 and "unknown key 'train.epoks'" in bad.output and "Traceback" not in bad.output
    bad_loss = runner.invoke(app, ["config", "show", "--set", "loss.name=tripplet"])
    assert bad_loss.exit_code == 2 and "unknown loss" in bad_loss.output


def test_train_evaluate_and_refuse_existing_out(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--out", str(out), "--no-progress", *FAST])
    assert result.exit_code == 0, result.output
    assert "map@r" in result.output and "report.html" in result.output
    again = runner.invoke(app, ["train", "--out", str(out), *FAST])
    assert again.exit_code == 2 and "--overwrite" in again.output
    resumed = runner.invoke(app, ["train", "--out", str(out), "--resume", "--no-progress", "--set", "train.epochs=2"])
    assert resumed.exit_code == 0, resumed.output
    ev = runner.invoke(app, ["evaluate", str(out), "--checkpoint", "last"])
    assert ev.exit_code == 0, ev.output
    metrics = json.loads((out / "eval_last.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert metrics["map@r"] == pytest.approx(summary["test"]["map@r"], abs=1e-6)
    not_run = runner.invoke(app, ["evaluate", str(tmp_path)])
    assert not_run.exit_code == 2 and "not a run folder" in not_run.output


def test_evaluate_embedding_files(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8)).astype(np.float32)
    y = np.repeat(np.arange(8), 5)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    result = runner.invoke(app, ["evaluate", "--embeddings", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"),
                                 "--json", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    assert 0 <= json.loads((tmp_path / "m.json").read_text())["map@r"] <= 1
    np.save(tmp_path / "yf.npy", y + 0.5)
    bad = runner.invoke(app, ["evaluate", "--embeddings", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "yf.npy")])
    assert bad.exit_code == 2 and "integer" in bad.output
    neither = runner.invoke(app, ["evaluate"])
    assert neither.exit_code != 0


def test_resume_requires_out():
    result = runner.invoke(app, ["train", "--resume"])
    assert result.exit_code != 0 and "--resume needs --out" in result.output


def test_interrupt_says_how_to_resume(tmp_path, monkeypatch):
    from deepmetric.training import Trainer

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "fit", interrupted)
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "run"), *FAST])
    assert result.exit_code == 130 and "--resume" in result.output
