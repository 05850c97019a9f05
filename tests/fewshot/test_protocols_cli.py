"""``deepmetric transfer`` and ``deepmetric ood``, tiny end to end on digits."""

import csv
import json

from typer.testing import CliRunner

from deepmetric.cli import app

runner = CliRunner()
TINY_SOURCE = ["--set", "source.train.epochs=1", "--set", "source.train.iterations_per_epoch=2",
               "--set", "source.eval.ks=[1]"]


def _rows(path):
    with path.open() as f:
        return list(csv.DictReader(f))


def test_transfer_end_to_end_and_reuses_the_source_runs(tmp_path):
    out = tmp_path / "transfer"
    args = ["transfer", "--out", str(out), "--k", "1", "--k", "2", "--n", "2", *TINY_SOURCE,
            "--set", "episodes=2", "--set", "query=4", "--set", "protonet.shots=1",
            "--set", "methods=[baseline, weight_transfer, dml, protonet, adapted_dml, adapted_protonet]",
            "--set", "protonet.set=[model.normalize=false, train.epochs=1, train.iterations_per_epoch=2]",
            *[item for m in ("weight_transfer", "adapted_dml", "adapted_protonet")
              for item in ("--set", f"{m}.max_epochs=2", "--set", f"{m}.patience=1")]]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = _rows(out / "results.csv")
    # k = 1: no adapted methods (as in the paper); k = 2: all six
    assert sorted((r["k"], r["method"]) for r in rows) == sorted(
        [("1", m) for m in ("baseline", "weight_transfer", "dml", "protonet")]
        + [("2", m) for m in ("baseline", "weight_transfer", "dml", "protonet", "adapted_dml", "adapted_protonet")])
    assert all(0 <= float(r["accuracy"]) <= 1 and r["episodes"] == "2" for r in rows)
    assert len(_rows(out / "episodes.csv")) == 2 * len(rows)
    assert "| adapted prototypical network | – |" in (out / "results.md").read_text()
    assert (out / "error_vs_k.png").stat().st_size > 10_000
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and again.output.count("reusing the finished run") == 3
    assert _rows(out / "results.csv") == rows  # seeded: the same episodes and fits


def test_transfer_config_errors_are_friendly(tmp_path):
    result = runner.invoke(app, ["transfer", "--out", str(tmp_path), "--set", "method=[dml]"])
    assert result.exit_code == 2 and "unknown key 'method'" in result.output and "methods" in result.output
    result = runner.invoke(app, ["transfer", "--out", str(tmp_path), "--k", "0"])
    assert result.exit_code == 2 and "ks (the command's --k) must be" in result.output


def test_ood_end_to_end(tmp_path):
    out = tmp_path / "ood"
    result = runner.invoke(app, [
        "ood", "--out", str(out), *TINY_SOURCE, "--set", "generate.n_iter=3", "--set", "generate.swaps_per_iter=1",
        "--set", "generate.keep=2", "--set", "fewshot.shots=[2]", "--set", "fewshot.episodes=1",
        "--set", "fewshot.epochs=2", "--set", "fewshot.metric=map@r"])
    assert result.exit_code == 0, result.output
    splits = json.loads((out / "splits.json").read_text())
    assert list(splits) == ["1", "2"] and splits["1"]["fid"] < splits["2"]["fid"]
    rows = _rows(out / "results.csv")
    assert [r["split"] for r in rows] == ["1", "2"]
    for r in rows:
        assert 0 <= float(r["recall@1"]) <= 1 and 0 <= float(r["map@r"]) <= 1
        assert 0 <= float(r["2shot_map@r_before"]) <= 1 and 0 <= float(r["2shot_map@r_after"]) <= 1
    assert (out / "ood.png").stat().st_size > 10_000 and (out / "runs" / "split_2" / "summary.json").is_file()
