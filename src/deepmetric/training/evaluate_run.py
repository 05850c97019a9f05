"""Re-evaluating a finished (or interrupted) run folder from its checkpoint."""

from __future__ import annotations

from pathlib import Path

from deepmetric import evaluation
from deepmetric.errors import RunFolderError
from deepmetric.training import checkpoint
from deepmetric.training.build import build_model, build_splits, resolve_device
from deepmetric.training.config import load
from deepmetric.training.embed import embed


def evaluate_run(run_dir: str | Path, which: str = "best") -> dict[str, float]:
    """Test metrics of the run's ``best`` (falls back to ``last`` when nothing was selected) or ``last`` checkpoint."""
    run_dir = Path(run_dir)
    if which not in ("best", "last"):
        raise RunFolderError(f"--checkpoint must be 'best' or 'last', got {which!r}")
    if not (run_dir / "config.yaml").is_file():
        raise RunFolderError(f"{run_dir} is not a run folder (no config.yaml); give the --out of `deepmetric train`")
    path = run_dir / "checkpoints" / f"{which}.pt"
    if which == "best" and not path.is_file():
        path = run_dir / "checkpoints" / "last.pt"
    if not path.is_file():
        raise RunFolderError(f"no checkpoint in {run_dir / 'checkpoints'}")
    cfg = load(run_dir / "config.yaml")
    device = resolve_device(cfg.device)
    model = build_model(cfg).to(device)
    model.load_state_dict(checkpoint.load(path, device)["model"])
    splits = build_splits(cfg)
    kw = dict(ks=tuple(cfg.eval.ks), distance=cfg.eval.distance)
    if splits.test is not None:
        return evaluation.evaluate(*embed(model, splits.test, cfg.eval.batch_size, device), **kw)
    q = embed(model, splits.query, cfg.eval.batch_size, device)
    g = embed(model, splits.gallery, cfg.eval.batch_size, device)
    return evaluation.evaluate(g[0], g[1], query_embeddings=q[0], query_labels=q[1], **kw)
