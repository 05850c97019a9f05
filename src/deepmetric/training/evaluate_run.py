"""Re-evaluating a finished (or interrupted) run folder from its checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from deepmetric import evaluation
from deepmetric.errors import RunFolderError
from deepmetric.training import checkpoint
import torch
from torch import nn

from deepmetric.data.base import MetricDataset
from deepmetric.training.build import Splits, build_model, build_splits, resolve_device
from deepmetric.training.config import EvalConfig, RunConfig, load
from deepmetric.inference import embed


Embedded = tuple[torch.Tensor, torch.Tensor]


def embed_test(splits: Splits, embedder: Callable[[MetricDataset], Embedded]) -> tuple[Embedded | None, Embedded]:
    """``(query, gallery)`` embeddings and labels of the test split: ``(None, test)`` for leave-one-out on
    ``test``, else ``query`` vs ``gallery``; ``embedder(dataset)`` embeds one data set."""
    if splits.test is not None:
        return None, embedder(splits.test)
    return embedder(splits.query), embedder(splits.gallery)


def score_test(query: Embedded | None, gallery: Embedded, cfg: EvalConfig) -> dict[str, float]:
    """The metrics of :func:`embed_test`'s embeddings (leave-one-out when ``query`` is None)."""
    kw = dict(ks=tuple(cfg.ks), distance=cfg.distance)
    if query is None:
        return evaluation.evaluate(*gallery, **kw)
    return evaluation.evaluate(*gallery, query_embeddings=query[0], query_labels=query[1], **kw)


def evaluate_model(
    model: nn.Module, splits: Splits, cfg: EvalConfig, device: torch.device, amp: bool | torch.dtype = False
) -> tuple[dict[str, float], Embedded]:
    """Test metrics of ``model`` (leave-one-out on ``test``, or ``query`` vs ``gallery``), and the
    embeddings of the test (or gallery) items with their labels, e.g. for the report's t-SNE map."""
    query, gallery = embed_test(splits, lambda ds: embed(model, ds, cfg.batch_size, device, amp=amp))
    return score_test(query, gallery, cfg), gallery


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
