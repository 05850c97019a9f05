"""The README's composed-objective table comes from grids/digits_objectives.yaml: every run of it is valid."""

from pathlib import Path

from deepmetric.training import grid as G
from deepmetric.training.objective import build_objective
from deepmetric.training.build import build_model

ROOT = Path(__file__).resolve().parents[2]


def test_objectives_grid_plans_every_method_alone_and_with_sec_and_lsd(tmp_path):
    runs = G.plan(G.make_grid(ROOT / "grids" / "digits_objectives.yaml"), tmp_path)
    methods = ["multi_similarity", "triplet", "contrastive_bayesian", "hybrid", "ensemble"]
    assert {r.variant for r in runs} == {m + s for m in methods for s in ("", "+sec", "+lsd")}
    assert len(runs) == 45 and {r.seed for r in runs} == {0, 1, 2}
    for run in runs:
        if run.seed == 0:  # each objective builds on its model
            model = build_model(run.cfg)
            objective = build_objective(run.cfg, num_classes=5, num_samples=100, model=model)
            assert run.cfg.method.replace("+", "") == run.variant.replace("+", "")
            assert sorted(objective.terms) == sorted(t.name for t in run.cfg.terms())
