"""Re-evaluating a finished (or interrupted) run folder from its checkpoint."""

from __future__ import annotations

from pathlib import Path

from deepmetric import evaluation
from deepmetric.errors import RunFolderError
from deepmetric.training import checkpoint
import torch
from torch import nn

from deepmetric.training.build import Splits, build_model, build_splits, resolve_device
from deepmetric.training.config import EvalConfig, RunConfig, load
from deepmetric.inference import embed


def evaluate_model(
    model: nn.Module, splits: Splits, cfg: EvalConfig, device: torch.device, amp: bool = False
) -> tuple[dict[str, float], tuple[torch.Tensor, torch.Tensor]]:
    """Test metrics of ``model`` (leave-one-out on ``test``, or ``query`` vs ``gallery``), and the
    embeddings of the test (or gallery) items with their labels, e.g. for the report's t-SNE map."""
    kw = dict(ks=tuple(cfg.ks), distance=cfg.distance)
    run = lambda ds: embed(model, ds, cfg.batch_size, device, amp=amp)  # noqa: E731
    if splits.test is not None:
        gallery = run(splits.test)
        return evaluation.evaluate(*gallery, **kw), gallery
    query, gallery = run(splits.query), run(splits.gallery)
    return evaluation.evaluate(*gallery, query_embeddings=query[0], query_labels=query[1], **kw), gallery


def load_run_model(run_dir: str | Path, which: str = "best") -> tuple[RunConfig, nn.Module, torch.device]:
    """The run's config and its model with the ``best`` (falls back to ``last`` when nothing was selected)
    or ``last`` checkpoint's weights, on the run's device."""
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
    return cfg, model, device


def evaluate_run(run_dir: str | Path, which: str = "best") -> dict[str, float]:
    """Test metrics of the run's ``best`` (falls back to ``last`` when nothing was selected) or ``last`` checkpoint."""
    cfg, model, device = load_run_model(run_dir, which)
    return evaluate_model(model, build_splits(cfg), cfg.eval, device)[0]
