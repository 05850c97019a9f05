"""``make demo``: multi-similarity on ``digits``, compared with raw pixels and the untrained network."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deepmetric import data, evaluation
from deepmetric.training.config import load
from deepmetric.training.trainer import Trainer


def run_demo(out: str | Path, overwrite: bool = False, overrides: list[str] | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Train the default (digits) configuration and return the summary with the two baselines."""
    cfg = load(None, overrides)
    test = data.build(cfg.data.name, root=cfg.data.root, split=cfg.data.test_split)
    raw = evaluation.evaluate(test.raw_features(), test.labels, ks=tuple(cfg.eval.ks), distance=cfg.eval.distance)
    trainer = Trainer(cfg, out, overwrite=overwrite, progress=progress, baselines={"raw pixels": raw})
    return trainer.fit()
