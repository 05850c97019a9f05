"""``deepmetric ood``: DML under growing train-test shift, on ooDML splits (Milbich et al., NeurIPS 2021).

1. Splits: a published or generated split file (``splits``), or generated here from class-mean features
   of the data set (:func:`deepmetric.data.oodml.oodml_splits`; raw inputs or the ``extractor`` run's
   embedding) and written to ``splits.json``.
2. Zero-shot: the source run is trained on each split's train classes (data set ``oodml``) and its test
   metrics (``metrics``, default Recall@1 and MAP@R, leave-one-out on the test classes) recorded.
3. Few-shot (the paper's ``fewshot_ood_main.py``): per split and number of shots, ``episodes`` episodes
   over all test classes (the split file's ``test_episodes`` when it has them and the data set has image
   paths, else seeded samples); the query set is the rest of each class. ``fewshot.metric`` (Recall@1
   as the paper) on the query set (leave-one-out) before and after fine-tuning the embedding head's last linear layer on the support
   set with the margin loss and distance-weighted sampling (Adam, lr = ``lr_mult`` x the run's lr).
4. ``results.csv``, ``results.md`` and ``ood.png``: metrics against the FID of each split, the few-shot
   metric before/after adaptation and its relative gain.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepmetric import data, evaluation
from deepmetric.data.base import MetricDataset, Subset
from deepmetric.data.oodml import (
    OODSplit,
    all_classes,
    class_names,
    dataset_features,
    load_splits,
    oodml_splits,
    save_splits,
)
from deepmetric.fewshot.adapted import adapt_embedding
from deepmetric.fewshot.config import OODConfig, TargetFit
from deepmetric.fewshot.episodes import Episode, EpisodeSampler, episodes_from_published
from deepmetric.fewshot.sources import embed_items, stack_inputs, train_or_reuse
from deepmetric.training.build import build_miner, build_splits, resolve_device
from deepmetric.training.config import RunConfig, dump, validate
from deepmetric.training.evaluate_run import load_run_model
from deepmetric.training.objective import build_objective


def _base_kwargs(cfg: RunConfig) -> dict[str, Any]:
    kwargs = dict(cfg.data.kwargs)
    if "augment" in data.DATASETS.parameters(cfg.data.name):
        kwargs["augment"] = False
    return kwargs


def _names(dataset: MetricDataset) -> list[str]:
    names = class_names(dataset)
    return [names[c] for c in np.unique(dataset.labels)]


def generate_splits(cfg: OODConfig, out: Path) -> Path:
    """Generate the ooDML splits of the source data set (initial split: its train/test classes) into
    ``out/splits.json``."""
    d = cfg.source.data
    base = all_classes(d.name, d.root, **_base_kwargs(cfg.source))
    extractor, device = None, torch.device("cpu")
    if cfg.extractor is not None:
        _, extractor, device = load_run_model(cfg.extractor)
    features = dataset_features(base, extractor, device=device)
    sides = [_names(data.build(d.name, root=d.root, split=s, **_base_kwargs(cfg.source)))
             for s in (d.train_split, d.test_split)]
    g = cfg.generate
    splits = oodml_splits(features, base.labels, class_names(base), *sides, n_iter=g.n_iter,
                          swaps_per_iter=g.swaps_per_iter, history=g.history, easier_iter=g.easier_iter,
                          easier_history=g.easier_history, removal_iter=g.removal_iter, keep=g.keep,
                          val_fraction=g.val_fraction, seed=cfg.seed)
    return save_splits(splits, out / "splits.json")


def split_config(cfg: OODConfig, split_file: Path, split_id: int) -> RunConfig:
    """The source run on the train/test classes of split ``split_id``."""
    raw = cfg.source.model_dump(mode="json")
    d = raw["data"]
    d.update(name="oodml", train_split="train", test_split="test", query_split=None, gallery_split=None,
             kwargs={"dataset": d["name"], "splits": str(split_file), "split_id": split_id, **d["kwargs"]})
    return validate(raw)


def _item_paths(dataset: MetricDataset) -> list[str] | None:
    if isinstance(dataset, Subset):
        inner = getattr(dataset.dataset, "paths", None)
        return None if inner is None else [str(inner[i]) for i in dataset.indices]
    paths = getattr(dataset, "paths", None)
    return None if paths is None else [str(p) for p in paths]


def fewshot_episodes(cfg: OODConfig, split: OODSplit, test: MetricDataset, shots: int) -> list[Episode]:
    """The split file's episodes for ``shots`` when it has them (and the items have paths), else seeded
    all-way ``shots``-shot episodes over the test classes."""
    published = split.test_episodes.get(shots)
    paths = _item_paths(test)
    if published and paths is not None:
        return episodes_from_published(test.labels, class_names(test), paths, published)
    n_way = len(np.unique(test.labels))
    return list(EpisodeSampler(test.labels, n_way, shots, None, cfg.fewshot.episodes, seed=cfg.seed))


def _score(embeddings: torch.Tensor, labels: np.ndarray, metric: str) -> float:
    return evaluation.evaluate(embeddings, labels, metrics=[metric])[metric]


def fewshot_gain(cfg: OODConfig, run_cfg: RunConfig, model: torch.nn.Module, test: MetricDataset,
                 episodes: list[Episode], device: torch.device) -> tuple[float, float]:
    """Mean query ``fewshot.metric`` over ``episodes`` before and after adapting ``model`` on each support set."""
    f = cfg.fewshot
    adapt_cfg = validate({"model": run_cfg.model.model_dump(mode="json"), "loss": f.loss.model_dump(mode="json"),
                          "miner": f.miner.model_dump(mode="json")})
    fit = TargetFit(lr=f.lr_mult * run_cfg.optimizer.lr, max_epochs=f.epochs, batch_size=f.batch_size, params=f.params)
    before, after = [], []
    for i, ep in enumerate(episodes):
        before.append(_score(embed_items(model, test, ep.query, device), ep.query_labels, f.metric))
        x = stack_inputs(test, ep.support, device)
        y = torch.as_tensor(ep.support_labels, device=device)
        objective = build_objective(adapt_cfg, num_classes=ep.n_way, num_samples=len(y), model=model).to(device)
        torch.manual_seed(cfg.seed + i)  # the distance-weighted miner draws from torch's RNG
        adapted = adapt_embedding(model, x, y, objective, fit, None, build_miner(adapt_cfg), cfg.seed + i).model
        after.append(_score(embed_items(adapted, test, ep.query, device), ep.query_labels, f.metric))
    return float(np.mean(before)), float(np.mean(after))


def run_ood(cfg: OODConfig, out: str | Path, overwrite: bool = False, progress: bool = False,
            echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train and evaluate on every split (reusing finished runs), write the tables and the plot."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ood.yaml").write_text(dump(cfg))
    split_file = Path(cfg.splits).resolve() if cfg.splits else generate_splits(cfg, out).resolve()
    splits = load_splits(split_file)
    echo("splits (FID): " + ", ".join(f"{s.id}: {s.fid:.1f}" for s in splits))
    device = resolve_device(cfg.source.device)
    rows = []
    for split in splits:
        run_cfg = split_config(cfg, split_file, split.id)
        model, summary = train_or_reuse(run_cfg, out / "runs" / f"split_{split.id}", overwrite, progress, echo)
        row: dict[str, Any] = {"split": split.id, "fid": split.fid, "train_classes": len(split.train),
                               "test_classes": len(split.test)}
        row.update({m: summary["test"][m] for m in cfg.metrics})
        if cfg.fewshot.shots:
            test = build_splits(run_cfg).test
            for shots in cfg.fewshot.shots:
                eps = fewshot_episodes(cfg, split, test, shots)
                pre, post = fewshot_gain(cfg, run_cfg, model, test, eps, device)
                metric = cfg.fewshot.metric
                row.update({f"{shots}shot_{metric}_before": pre, f"{shots}shot_{metric}_after": post,
                            f"{shots}shot_gain_%": 100 * (post - pre) / pre if pre else float("nan")})
        rows.append(row)
        echo(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    with (out / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.md").write_text(results_markdown(rows, cfg))
    plot_ood(rows, cfg, out / "ood.png")
    return rows


def results_markdown(rows: list[dict[str, Any]], cfg: OODConfig) -> str:
    cols = [k for k in rows[0] if k != "split"]

    def fmt(v: Any) -> str:
        if not isinstance(v, float):
            return str(v)
        return f"{v:.1f}" if abs(v) >= 10 else f"{v:.3f}"

    lines = [f"ooDML splits of {cfg.source.data.name} ({cfg.source.method}); few-shot: {cfg.fewshot.metric} on "
             f"the query set before/after adapting ({cfg.fewshot.params}), {cfg.fewshot.epochs} epochs.", "",
             "| split | " + " | ".join(cols) + " |", "|---:|" + "---:|" * len(cols)]
    lines += [f"| {r['split']} | " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot_ood(rows: list[dict[str, Any]], cfg: OODConfig, path: Path) -> None:
    """Zero-shot metrics, the few-shot metric before/after adaptation, and its relative gain against FID."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fid = np.array([r["fid"] for r in rows])
    shots, metric = cfg.fewshot.shots, cfg.fewshot.metric
    fig, axes = plt.subplots(1, 3 if shots else 1, figsize=(15 if shots else 5.5, 4.4), squeeze=False)
    ax = axes[0][0]
    for name, marker in zip(cfg.metrics, "os^D"):
        ax.plot(fid, [r[name] for r in rows], marker=marker, lw=1.8, label=name)
    for r in rows:
        ax.annotate(str(r["split"]), (r["fid"], r[cfg.metrics[0]]), textcoords="offset points", xytext=(3, 5),
                    fontsize=8)
    ax.set_title("zero-shot, test classes (numbers: split ids)")
    ax.set_ylabel("metric")
    if shots:
        for s, color in zip(shots, plt.rcParams["axes.prop_cycle"].by_key()["color"]):
            axes[0][1].plot(fid, [r[f"{s}shot_{metric}_before"] for r in rows], ls="--", marker="o", color=color,
                            label=f"{s}-shot, before")
            axes[0][1].plot(fid, [r[f"{s}shot_{metric}_after"] for r in rows], ls="-", marker="o", color=color,
                            label=f"{s}-shot, adapted")
            axes[0][2].plot(fid, [r[f"{s}shot_gain_%"] for r in rows], marker="o", color=color, label=f"{s}-shot")
        axes[0][1].set_title(f"few-shot: {metric} on the query set")
        axes[0][1].set_ylabel(metric)
        axes[0][2].axhline(0, color="grey", lw=0.8)
        axes[0][2].set_title("few-shot adaptation: relative gain")
        axes[0][2].set_ylabel(f"{metric} gain (%)")
    for a in axes[0]:
        a.set_xlabel("FID between train and test class means")
        a.grid(alpha=0.3)
        a.legend(fontsize=8.5)
    fig.suptitle(f"ooDML on {cfg.source.data.name}: {cfg.source.method} under increasing train-test shift")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
