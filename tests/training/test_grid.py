"""`deepmetric benchmark`: grids of configs x variants x seeds, resume, the tables, and the Reality Check."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from deepmetric import evaluation
from deepmetric.cli import app
from deepmetric.data.base import class_folds
from deepmetric.errors import ConfigError, RunFolderError, UnknownNameError
from deepmetric.training import Hook, Trainer, load
from deepmetric.training import grid as G
from deepmetric.training.build import build_splits
from deepmetric.training.config import dump
from deepmetric.training.evaluate_run import load_run_model
from deepmetric.training.runfolder import read_records

ROOT = Path(__file__).resolve().parents[2]
# + train.epochs in each test (a key given twice is swept)
TINY = ["train.iterations_per_epoch=2", "eval.tsne=false", "eval.ks=[1,2]", "model.backbone_kwargs={width: 8}"]


def _sets(items):
    return [a for s in items for a in ("--set", s)]


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------- folds

def test_class_folds_are_contiguous_disjoint_and_cover_the_classes():
    labels = np.repeat(np.arange(10, 20), 3)
    held = [class_folds(labels, 4, f)[1].tolist() for f in range(4)]
    assert held == [[10, 11, 12], [13, 14, 15], [16, 17], [18, 19]]  # near-equal chunks of the sorted ids
    kept, held1 = class_folds(labels, 4, 1)
    assert set(kept) | set(held1) == set(range(10, 20)) and not set(kept) & set(held1)
    with pytest.raises(ConfigError, match="use fewer folds"):
        class_folds(np.arange(5), 4, 0)  # a 1-class fold cannot rank anything
    with pytest.raises(ConfigError, match="numbered from 0"):
        class_folds(labels, 4, 4)


def test_fold_keys_in_the_config():
    cfg = load(None, ["data.val_folds=2", "data.val_fold=1"])
    splits = build_splits(cfg)
    assert set(splits.val.labels) == {3, 4} and set(splits.train.labels) == {0, 1, 2}
    assert not splits.val.augment and splits.train.augment  # the validation fold is embedded without augmentation
    for bad, match in ((["data.val_folds=1"], "at least 2"), (["data.val_folds=2", "data.val_fold=2"], "below"),
                       (["data.val_folds=2", "data.val_classes=2"], "not both")):
        with pytest.raises(ConfigError, match=match):
            load(None, bad)


# ------------------------------------------------------------------------------------------- the grid

def test_repeated_set_keys_are_swept():
    common, variants = G.sweep(["loss.name=a", "train.epochs=3", "loss.name=b", "optimizer.lr=0.1",
                                "optimizer.lr=0.2", "loss.name=a"])
    assert common == ["train.epochs=3"]
    assert variants == {
        "loss.name=a optimizer.lr=0.1": ["loss.name=a", "optimizer.lr=0.1"],
        "loss.name=a optimizer.lr=0.2": ["loss.name=a", "optimizer.lr=0.2"],
        "loss.name=b optimizer.lr=0.1": ["loss.name=b", "optimizer.lr=0.1"],
        "loss.name=b optimizer.lr=0.2": ["loss.name=b", "optimizer.lr=0.2"],
    }


def test_grid_file_variants_configs_and_command_line(tmp_path):
    (tmp_path / "cub200").mkdir()
    (tmp_path / "cars196").mkdir()
    for d in ("cub200", "cars196"):
        (tmp_path / d / "ms.yaml").write_text("train: {epochs: 7}\n")
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(
        "configs: [cub200/ms.yaml, cars196/ms.yaml]\nseeds: [3, 4]\nset: [train.epochs=5, eval.tsne=false]\n"
        "variants:\n  ms: [loss.name=multi_similarity]\n"
        "  ms+xbm: {loss.name: multi_similarity, memory.size: 128, eval.ks: [1, 4]}\n"
    )
    grid = G.make_grid(grid_file, overrides=["optimizer.lr=0.1", "optimizer.lr=0.2", "train.epochs=2"])
    assert list(grid.configs) == ["cub200/ms", "cars196/ms"]  # named apart by their folders
    assert list(grid.variants) == ["ms optimizer.lr=0.1", "ms optimizer.lr=0.2",
                                   "ms+xbm optimizer.lr=0.1", "ms+xbm optimizer.lr=0.2"]
    runs = G.plan(grid, tmp_path / "out")
    assert len(runs) == 2 * 4 * 2
    run = runs[-1]
    assert (run.config, run.variant, run.seed) == ("cars196/ms", "ms+xbm optimizer.lr=0.2", 4)
    assert run.folder == tmp_path / "out" / "cars196" / "ms" / "ms+xbm_optimizer.lr=0.2" / "seed4"
    c = run.cfg
    assert (c.seed, c.train.epochs, c.memory.size, c.eval.ks, c.optimizer.lr) == (4, 2, 128, [1, 4], 0.2)
    assert G.make_grid(grid_file, seeds=[9], configs=[tmp_path / "cub200" / "ms.yaml"]).seeds == [9]

    grid_file.write_text("configs: [ms.yaml]\nseed: [1]\n")
    with pytest.raises(ConfigError, match="(?s)'seed': Extra inputs.*Valid keys: configs, variants, seeds"):
        G.make_grid(grid_file)
    grid_file.write_text("configs: [nothere.yaml]\n")
    with pytest.raises(ConfigError, match="config file not found: nothere.yaml"):
        G.make_grid(grid_file)
    grid_file.write_text("variants: {a: [loss.name=multi_similarity], b: [loss.name=multi_similarty]}\n")
    with pytest.raises(UnknownNameError, match=r"defaults \| b: .*Did you mean 'multi_similarity'"):
        G.plan(G.make_grid(grid_file), tmp_path / "out")  # every config is checked before anything trains
    with pytest.raises(ConfigError, match="distinct"):
        G.make_grid(seeds=[1, 1])


def test_shipped_grid_file_plans():
    grid = G.make_grid(ROOT / "grids" / "digits_losses.yaml")
    runs = G.plan(grid, "unused")
    assert len(runs) == 3 * 3 and {r.cfg.loss.name for r in runs} == {"contrastive", "triplet", "multi_similarity"}
    assert all(r.cfg.data.val_classes == 2 for r in runs)


def test_every_shipped_grid_plans_with_valid_components():
    for path in sorted((ROOT / "grids").glob("*.yaml")):
        runs = G.plan(G.make_grid(path), "unused")  # checks every run's config and component keywords
        assert runs and len({(r.variant, r.seed) for r in runs}) == len(runs), path.name
    proxy = G.plan(G.make_grid(ROOT / "grids" / "digits_proxy_losses.yaml"), "unused")
    assert len(proxy) == 19 * 3 and all(r.cfg.train.select_on == "auto" and not r.cfg.data.val_classes for r in proxy)


def test_aggregate_mean_std_and_t_interval():
    recs = [{"config": "c", "variant": "v", "view": "single", "seed": s, "fold": "", "selected_on": "test",
             "selected_epoch": 1, "folder": "x", "map@r": m, "recall@1": 0.9, "n_lone_queries": 0}
            for s, m in ((0, 0.1), (1, 0.3))]
    (row,) = G.aggregate(recs)
    assert row["n"] == 2 and row["map@r_mean"] == pytest.approx(0.2)
    assert row["map@r_std"] == pytest.approx(0.1 * 2**0.5)
    assert row["map@r_ci95"] == pytest.approx(12.7062 * 0.1, rel=1e-4)  # t(0.975, 1 dof) * s / sqrt(2)
    assert "n_lone_queries_mean" not in row
    md = G.markdown_table([row], "standard")
    assert md.splitlines()[0] == "| config | variant | selected on | n | MAP@R | R@1 | MAP@R 95% CI |"
    assert "0.2000 ± 0.1414" in md and "[-1.0706, 1.4706]" in md and "WARNING" in md


def _rec(variant, seed, map_r, r1, untrained=None):
    extra = {} if untrained is None else {"untrained/map@r": untrained[0], "untrained/recall@1": untrained[1]}
    return {"config": "c", "variant": variant, "view": "single", "seed": seed, "fold": "", "selected_on": "last",
            "selected_epoch": 2, "folder": "x", "map@r": map_r, "recall@1": r1, **extra}


def test_paired_differences_against_a_variant_by_hand():
    recs = [_rec("base", 0, 0.30, 0.90), _rec("base", 1, 0.50, 0.80),
            _rec("new", 0, 0.40, 0.85), _rec("new", 1, 0.55, 0.85), _rec("new", 2, 0.9, 0.9)]  # seed 2: no base
    rows = {r["variant"]: r for r in G.aggregate(recs, {"new": "base"})}
    new = rows["new"]
    assert "baseline" not in rows["base"] and new["baseline"] == "base"
    assert new["map@r_n_paired"] == 2 and new["map@r_delta_mean"] == pytest.approx(0.075)  # (0.10 + 0.05) / 2
    assert new["map@r_delta_std"] == pytest.approx(0.05 / 2**0.5)
    assert new["recall@1_delta_mean"] == pytest.approx(0.0)  # -0.05 and +0.05
    assert new["recall@1_ge_baseline"] == 1 and new["map@r_ge_baseline"] == 2
    assert new["map@r_mean"] == pytest.approx((0.40 + 0.55 + 0.9) / 3)  # the plain mean keeps every seed
    md = G.markdown_table(list(rows.values()), "standard")
    head = md.splitlines()[0]
    assert head.endswith("| baseline | Δ MAP@R (paired) | Δ R@1 (paired) | seeds ≥ baseline (MAP@R, R@1) |")
    assert "| base | +0.0750 ± 0.0354 | +0.0000 ± 0.0707 | 2/2, 1/2 |" in md
    assert "**Δ (paired)**" in md


def test_paired_differences_against_the_untrained_network():
    recs = [_rec("a", 0, 0.30, 0.90, (0.35, 0.96)), _rec("a", 1, 0.40, 0.95, (0.36, 0.94)),
            _rec("b", 0, 0.33, 0.97, (0.35, 0.96)), _rec("b", 1, 0.46, 0.93, (0.36, 0.94))]
    rows = G.aggregate(recs, {"a": "untrained", "b": "untrained"})
    a, b = rows
    assert a["map@r_delta_mean"] == pytest.approx((-0.05 + 0.04) / 2) and a["recall@1_ge_baseline"] == 1
    assert b["recall@1_delta_mean"] == pytest.approx((0.01 - 0.01) / 2) and b["map@r_ge_baseline"] == 1
    assert a["untrained/map@r_mean"] == pytest.approx(0.355)
    md = G.markdown_table(rows, "standard")
    assert "−0.0050 ± " in md  # a real minus sign
    assert "mean ± std over the seeds: MAP@R 0.3550 ± 0.0071, R@1 0.9500 ± 0.0141" in md
    recs[2]["untrained/map@r"] = 0.1  # b's networks differ from a's: each is named
    recs.append(_rec("c", 0, 0.3, 0.9, (0.35, 0.96)))
    recs.append(_rec("c", 1, 0.3, 0.9, (0.36, 0.94)))
    md = G.markdown_table(G.aggregate(recs, dict.fromkeys("abc", "untrained")), "standard")
    assert ("over the seeds: MAP@R 0.3550 ± 0.0071, R@1 0.9500 ± 0.0141; b: MAP@R 0.2300 ± 0.1838, "
            "R@1 0.9500 ± 0.0141.") in md


def test_paired_differences_keep_the_reality_check_views_apart():
    recs = [{**_rec(v, s, m, 0.9), "view": view} for v, view, s, m in
            (("a", "separated", 0, 0.30), ("a", "concatenated", 0, 0.40), ("b", "separated", 0, 0.35),
             ("b", "concatenated", 0, 0.38), ("a", "fold", 0, 0.99))]  # fold rows are not compared
    rows = {(r["variant"], r["view"]): r for r in G.aggregate(recs, {"b": "a"})}
    assert rows[("b", "separated")]["map@r_delta_mean"] == pytest.approx(0.05)
    assert rows[("b", "concatenated")]["map@r_delta_mean"] == pytest.approx(-0.02)
    assert rows[("b", "concatenated")]["map@r_ge_baseline"] == 0


def test_untrained_metrics_come_from_the_epoch0_record_or_a_clear_error(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    with pytest.raises(RunFolderError, match="no epoch-0 evaluation in metrics.jsonl"):
        G.untrained_metrics(folder)  # no metrics.jsonl at all
    (folder / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test/map@r": 0.5}) + "\n")
    with pytest.raises(RunFolderError, match="so no untrained baseline"):
        G.untrained_metrics(folder)
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"epoch": 0, "event": "diverged"}, {"epoch": 0, "test/map@r": 0.3, "val/map@r": 0.6, "test/recall@1": 0.9},
        {"epoch": 1, "test/map@r": 0.5})) + "\n")
    assert G.untrained_metrics(folder) == {"map@r": 0.3, "recall@1": 0.9}


def test_baseline_resolution_and_errors(tmp_path):
    grid_file = tmp_path / "g.yaml"
    grid_file.write_text("variants: {ms: [loss.name=multi_similarity], c: [loss.name=contrastive], "
                         "t: [loss.name=triplet]}\nbaseline: ms\n")
    assert G.make_grid(grid_file).baselines == {"c": "ms", "t": "ms"}
    assert G.make_grid(grid_file, baseline="untrained").baselines == {v: "untrained" for v in ("ms", "c", "t")}
    crossed = G.make_grid(grid_file, overrides=["seed=1", "optimizer.lr=0.1", "optimizer.lr=0.2"])
    assert crossed.baselines["c optimizer.lr=0.1"] == "ms optimizer.lr=0.1"  # the same sweep value
    grid_file.write_text("variants: {ms: [loss.name=multi_similarity], c: [loss.name=contrastive]}\n"
                         "baseline: {c: ms}\n")
    assert G.make_grid(grid_file).baselines == {"c": "ms"}
    swept = G.make_grid(overrides=["loss.name=contrastive", "loss.name=triplet"], baseline="loss.name=triplet")
    assert swept.baselines == {"loss.name=contrastive": "loss.name=triplet"}
    for bad, match in (("nope", "must be 'untrained' or another variant"),):
        with pytest.raises(ConfigError, match=match):
            G.make_grid(grid_file, baseline=bad)
    grid_file.write_text("variants: {ms: [loss.name=multi_similarity]}\nbaseline: {x: ms}\n")
    with pytest.raises(ConfigError, match="'x' is not a variant"):
        G.make_grid(grid_file)
    with pytest.raises(ConfigError, match="needs the standard protocol"):
        G.make_grid(overrides=["seed=0"], baseline="untrained", protocol="reality-check")


# ------------------------------------------------------------------------------------------- running

def test_cli_sweep_writes_the_tables_and_skips_finished_runs(tmp_path):
    out = tmp_path / "bench"
    args = ["benchmark", "--set", "loss.name=contrastive", "--set", "loss.name=multi_similarity", "--seeds", "0,1",
            *_sets(TINY), "--set", "train.epochs=1", "--out", str(out), "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.output.count(": training") == 4
    runs, rows = _csv(out / "runs.csv"), _csv(out / "results.csv")
    assert len(runs) == 4 and [r["variant"] for r in rows] == ["loss.name=contrastive", "loss.name=multi_similarity"]
    for row in rows:
        summaries = [json.loads((out / r["folder"] / "summary.json").read_text())
                     for r in runs if r["variant"] == row["variant"]]
        values = [s["test"]["map@r"] for s in summaries]
        assert float(row["map@r_mean"]) == pytest.approx(np.mean(values))
        assert float(row["map@r_std"]) == pytest.approx(np.std(values, ddof=1))
        assert {s["config"]["seed"] for s in summaries} == {0, 1} and row["selected_on"] == "last"
        assert {s["config"]["loss"]["name"] for s in summaries} == {row["variant"].split("=")[1]}
    md = (out / "results.md").read_text()
    assert md.startswith("| config | variant | selected on | n | MAP@R | R-Precision | R@1 | R@2 |")
    assert "last epoch of a fixed schedule" in md and md in result.output.replace("\r", "")

    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and again.output.count("finished, skipped") == 4
    assert _csv(out / "results.csv") == rows

    # the same finished runs, compared with their untrained networks (read from each run's epoch-0 record)
    paired = CliRunner().invoke(app, [*args, "--baseline", "untrained"])
    assert paired.exit_code == 0 and paired.output.count("finished, skipped") == 4
    for run in _csv(out / "runs.csv"):
        epoch0 = read_records(out / run["folder"])[0]
        assert float(run["untrained/map@r"]) == pytest.approx(epoch0["test/map@r"])
    for row in _csv(out / "results.csv"):
        runs_of = [r for r in _csv(out / "runs.csv") if r["variant"] == row["variant"]]
        deltas = [float(r["map@r"]) - float(r["untrained/map@r"]) for r in runs_of]
        assert row["baseline"] == "untrained" and float(row["map@r_delta_mean"]) == pytest.approx(np.mean(deltas))
    assert "each run's own network before training" in (out / "results.md").read_text()


class Interrupt(Hook):
    def on_epoch_start(self, trainer, epoch):
        if epoch == 2:
            raise KeyboardInterrupt


def test_resume_interrupted_and_stale_runs_and_refuse_other_configs(tmp_path):
    out, lines = tmp_path / "bench", []
    grid = G.make_grid(overrides=[*TINY, "train.epochs=2"], seeds=[0, 1])
    first, second = G.plan(grid, out)
    with pytest.raises(KeyboardInterrupt):  # seed 0 stops after epoch 1 (it has a checkpoint)
        Trainer(first.cfg, first.folder, hooks=[Interrupt()], progress=False).fit()
    second.folder.mkdir(parents=True)
    (second.folder / "config.yaml").write_text(dump(second.cfg))  # seed 1 stopped before its first checkpoint
    rows = G.run_grid(grid, out, echo=lines.append)
    assert [line.split(": ")[-1] for line in lines] == ["resuming", "training"]
    assert [r["epoch"] for r in read_records(first.folder)] == [0, 1, 2]
    assert rows[0]["n"] == 2

    other = G.make_grid(overrides=[*TINY, "train.epochs=3"], seeds=[0])
    with pytest.raises(RunFolderError, match=r"different configuration \(train.epochs: 2 -> 3\).*--overwrite"):
        G.run_grid(other, out, echo=lines.append)
    G.run_grid(other, out, overwrite=True, echo=lines.append)
    assert json.loads((first.folder / "summary.json").read_text())["config"]["train"]["epochs"] == 3


def test_reality_check_folds_separated_and_concatenated(tmp_path):
    out = tmp_path / "rc"
    grid = G.make_grid(overrides=[*TINY, "train.epochs=1", "sampler.batch_size=32"], protocol="reality-check", folds=2)
    rows = G.run_grid(grid, out, echo=lambda line: None)
    fold_runs = G.plan(grid, out)
    assert [r.fold for r in fold_runs] == [0, 1]
    assert all(r.cfg.model.embedding_size == 128 and r.cfg.train.select_metric == "map@r" for r in fold_runs)
    summaries = [json.loads((r.folder / "summary.json").read_text()) for r in fold_runs]
    assert all(s["selected"]["split"] == "val" for s in summaries)

    separated, concatenated = rows
    assert (separated["view"], concatenated["view"]) == ("separated", "concatenated")
    assert separated["map@r_mean"] == pytest.approx(np.mean([s["test"]["map@r"] for s in summaries]))
    ensemble = json.loads((out / "defaults" / "default" / "seed0" / "ensemble.json").read_text())
    assert ensemble["embedding_size"] == 256
    assert [f["val_classes"] for f in ensemble["folds"]] == [[0, 1, 2], [3, 4]]
    # the concatenated view = the fold models' L2-normalised test embeddings, joined
    test = build_splits(fold_runs[0].cfg).test
    x = torch.stack([test[i][0] for i in range(len(test))])
    with torch.no_grad():
        joined = torch.cat([F.normalize(load_run_model(r.folder)[1].eval()(x), dim=-1) for r in fold_runs], dim=1)
    expected = evaluation.evaluate(joined, torch.as_tensor(test.labels), ks=(1, 2))
    assert concatenated["map@r_mean"] == pytest.approx(expected["map@r"], abs=1e-6)
    assert concatenated["recall@1_mean"] == pytest.approx(expected["recall@1"], abs=1e-6)
    md = (out / "results.md").read_text()
    assert "| view |" in md and "concatenated" in md and "held-out fold" in md

    with pytest.raises(ConfigError, match="use fewer folds"):  # digits has 5 training classes: 4 folds cannot work
        G.run_grid(G.make_grid(overrides=[*TINY, "train.epochs=1"], protocol="reality-check"), tmp_path / "rc4",
                   echo=lambda line: None)
