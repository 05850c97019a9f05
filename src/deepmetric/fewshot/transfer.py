"""``deepmetric transfer``: the k-shot inductive-transfer comparison of Scott, Ridgeway & Mozer (NeurIPS 2018).

Source classes = the source run's train split, target classes = its test split (``digits``: 0-4 → 5-9).
Source models are ordinary training runs (:class:`~deepmetric.training.trainer.Trainer`): the DML
embedding (the run as configured), a classifier (``classifier_set`` overrides, for weight transfer) and a
prototypical network (episodic training, ``protonet``). Then for every n (ways) and k (shots),
``episodes`` replications draw n target classes with k support items each and score every method on the
remaining items of those classes:

=================  ============================================================================
baseline           n-way classifier trained from scratch on the n·k items
weight_transfer    source classifier, new n-way output layer, all weights fine-tuned
dml                source DML embedding as is; 1-NN (cosine) or nearest prototype
protonet           source prototypical network as is; nearest prototype
adapted_dml        DML embedding fine-tuned on the n·k items with the source run's loss (k ≥ 2)
adapted_protonet   prototypical network fine-tuned episodically on the n·k items (k ≥ 2)
=================  ============================================================================

Target training uses the paper's stopping rule (:mod:`deepmetric.fewshot.adapted`). Adapted methods are
not run at k = 1 (as in the paper: a single example per class has no positive pair / query). Writes
``results.csv`` (one row per method, n, k), ``episodes.csv``, ``results.md`` and ``error_vs_k.png``.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepmetric.errors import ConfigError
from deepmetric.fewshot.adapted import adapt_embedding
from deepmetric.fewshot.config import METHODS, TransferConfig, derive
from deepmetric.training.config import dump
from deepmetric.fewshot.episodes import Episode, EpisodeSampler
from deepmetric.fewshot.prototypes import (
    classify,
    episode_accuracy,
    loo_knn_accuracy,
    loo_prototype_accuracy,
    mean_ci95,
)
from deepmetric.fewshot.sources import embed_items, stack_inputs, train_or_reuse
from deepmetric.fewshot.weight_transfer import weight_transfer
from deepmetric.losses.prototypical import PrototypicalLoss
from deepmetric.training.build import build_miner, build_model, build_splits, resolve_device
from deepmetric.training.config import RunConfig
from deepmetric.training.objective import Objective, build_objective

ADAPTED = ("adapted_dml", "adapted_protonet")


def method_labels(cfg: TransferConfig) -> dict[str, str]:
    """Human-readable names of the methods for tables and plots."""
    how = "1-NN" if cfg.dml_classifier == "knn" else "prototypes"
    return {
        "baseline": "baseline (classifier from scratch)",
        "weight_transfer": "weight transfer",
        "dml": f"DML embedding ({cfg.source.method}, {how})",
        "protonet": "prototypical network",
        "adapted_dml": f"adapted DML embedding ({how})",
        "adapted_protonet": "adapted prototypical network",
    }


def protonet_config(cfg: TransferConfig, shots: int) -> RunConfig:
    """The source run turned into episodic prototypical-network training with ``shots`` support items."""
    p = cfg.protonet
    m = shots + p.queries
    return derive(cfg.source, [*p.set, "objective=[]", "loss={name: prototypical}", f"loss.support={shots}",
                               "miner.name=null", "memory.size=0", f"sampler.m={m}",
                               f"sampler.batch_size={m * p.classes_per_episode}"])


class _Episodes:
    """Everything one (n, k) episode needs: the target set, the device and the source models."""

    def __init__(self, cfg: TransferConfig, target, device: torch.device, models: dict[str, Any]):
        self.cfg, self.target, self.device, self.models = cfg, target, device, models

    def seed(self, method: str, n: int, k: int, i: int) -> int:
        return int(np.random.SeedSequence([self.cfg.seed, n, k, i, METHODS.index(method)]).generate_state(1)[0])

    def score(self, method: str, ep: Episode, k: int, i: int) -> dict[str, Any]:
        """Query accuracy of ``method`` on episode ``i``; for trained methods also the epochs run and the
        epoch whose weights were kept (``None`` for embeddings used as they are)."""
        cfg, dev, models = self.cfg, self.device, self.models
        if method == "dml":
            return {"accuracy": episode_accuracy(models["dml_embeddings"], ep, cfg.dml_classifier)}
        if method == "protonet":
            return {"accuracy": episode_accuracy(models[f"protonet_embeddings/{k}"], ep, "prototype")}
        x = stack_inputs(self.target, ep.support, dev)
        y = torch.as_tensor(ep.support_labels, device=dev)
        seed = self.seed(method, ep.n_way, k, i)
        if method in ("weight_transfer", "baseline"):
            if method == "baseline":
                torch.manual_seed(seed)
                body = build_model(models["classifier_config"]).to(dev)
            else:
                body = models["classifier"]
            result = weight_transfer(body, x, y, ep.n_way, cfg.weight_transfer, seed, fresh=method == "baseline")
            logits = embed_items(result.model, self.target, ep.query, dev)
            return {"accuracy": float((logits.argmax(1).numpy() == ep.query_labels).mean()),
                    "epochs": result.epochs_run, "best_epoch": result.epoch}
        if method == "adapted_dml":
            source_cfg, model = cfg.source, models["dml"]
            objective = build_objective(source_cfg, num_classes=ep.n_way, num_samples=len(y), model=model).to(dev)
            classifier = cfg.dml_classifier
            accuracy = loo_knn_accuracy if classifier == "knn" else loo_prototype_accuracy
            result = adapt_embedding(model, x, y, objective, cfg.adapted_dml, accuracy, build_miner(source_cfg), seed)
        else:  # adapted_protonet
            fraction = cfg.adapted_protonet.support_fraction
            objective = Objective({"prototypical": PrototypicalLoss(support=fraction)}, {"prototypical": 1.0})
            classifier, model = "prototype", models[f"protonet/{k}"]
            result = adapt_embedding(model, x, y, objective, cfg.adapted_protonet, loo_prototype_accuracy, None, seed)
        with torch.no_grad():
            support = result.model(x)
        query = embed_items(result.model, self.target, ep.query, dev).to(dev)
        pred = classify(support, y, query, classifier)
        return {"accuracy": float((pred.cpu().numpy() == ep.query_labels).mean()),
                "epochs": result.epochs_run, "best_epoch": result.epoch}


def _train_sources(cfg: TransferConfig, out: Path, overwrite: bool, progress: bool,
                   echo: Callable[[str], None]) -> dict[str, Any]:
    device = resolve_device(cfg.source.device)
    models: dict[str, Any] = {}
    if {"dml", "adapted_dml"} & set(cfg.methods):
        models["dml"], _ = train_or_reuse(cfg.source, out / "sources" / "dml", overwrite, progress, echo)
    if {"weight_transfer", "baseline"} & set(cfg.methods):
        models["classifier_config"] = derive(cfg.source, cfg.classifier_set)
    if "weight_transfer" in cfg.methods:
        models["classifier"], _ = train_or_reuse(models["classifier_config"], out / "sources" / "classifier",
                                                 overwrite, progress, echo)
    if {"protonet", "adapted_protonet"} & set(cfg.methods):
        shots = {cfg.protonet.shots or k for k in cfg.ks}
        for s in sorted(shots):
            net, _ = train_or_reuse(protonet_config(cfg, s), out / "sources" / f"protonet_{s}shot",
                                    overwrite, progress, echo)
            for k in cfg.ks:
                if (cfg.protonet.shots or k) == s:
                    models[f"protonet/{k}"] = net
    models["device"] = device
    return models


def run_transfer(cfg: TransferConfig, out: str | Path, overwrite: bool = False, progress: bool = False,
                 echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train (or reuse) the source models, score every method on every (n, k) and write the tables and plot
    into ``out``; returns the summary rows."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "transfer.yaml").write_text(dump(cfg))
    target = build_splits(cfg.source).test
    if target is None:
        raise ConfigError("transfer needs a test split holding the target classes (data.test_split), "
                          "not query/gallery splits")
    models = _train_sources(cfg, out, overwrite, progress, echo)
    device = models["device"]
    everything = np.arange(len(target))
    if "dml" in cfg.methods:
        models["dml_embeddings"] = embed_items(models["dml"], target, everything, device)
    if "protonet" in cfg.methods:
        for k in cfg.ks:
            models[f"protonet_embeddings/{k}"] = embed_items(models[f"protonet/{k}"], target, everything, device)
    runner = _Episodes(cfg, target, device, models)

    rows, per_episode = [], []
    for n in cfg.ns:
        for k in cfg.ks:
            start = time.perf_counter()
            sampler = EpisodeSampler(target.labels, n, k, cfg.query, cfg.episodes, seed=cfg.seed)
            methods = [m for m in cfg.methods if k >= 2 or m not in ADAPTED]
            accs: dict[str, list[float]] = {m: [] for m in methods}
            for i, ep in enumerate(sampler):
                for m in methods:
                    scored = runner.score(m, ep, k, i)
                    accs[m].append(scored["accuracy"])
                    per_episode.append({"method": m, "n": n, "k": k, "episode": i, "epochs": None,
                                        "best_epoch": None, **scored})
            for m in methods:
                mean, ci = mean_ci95(accs[m])
                rows.append({"method": m, "n": n, "k": k, "episodes": len(accs[m]), "accuracy": mean,
                             "error": 1 - mean, "ci95": ci})
            echo(f"n={n} k={k}: " + ", ".join(f"{m} {100 * (1 - np.mean(a)):.1f}%" for m, a in accs.items())
                 + f" error ({time.perf_counter() - start:.0f} s)")
    _write_csv(out / "results.csv", rows)
    _write_csv(out / "episodes.csv", per_episode)
    (out / "results.md").write_text(results_markdown(rows, cfg))
    plot_error_vs_k(rows, cfg, out / "error_vs_k.png")
    return rows


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _setup(cfg: TransferConfig) -> str:
    d = cfg.source.data
    return (f"{d.name}: source = `{d.train_split}` classes, target = `{d.test_split}` classes; "
            f"{cfg.episodes} episodes per (n, k), queries = "
            f"{'all other items' if cfg.query is None else cfg.query} per class; "
            f"new output layers initialised `{cfg.weight_transfer.head_init}`")


def results_markdown(rows: list[dict[str, Any]], cfg: TransferConfig) -> str:
    """One table per n: test error % (mean ± 95% CI) with a row per method and a column per k."""
    labels = method_labels(cfg)
    lines = [f"k-shot transfer, test error % (mean ± 95% CI). {_setup(cfg)}.", ""]
    for n in cfg.ns:
        cell = {(r["method"], r["k"]): r for r in rows if r["n"] == n}
        lines += [f"**{n}-way**", "", "| method | " + " | ".join(f"k={k}" for k in cfg.ks) + " |",
                  "|---|" + "---:|" * len(cfg.ks)]
        for m in cfg.methods:
            vals = []
            for k in cfg.ks:
                r = cell.get((m, k))
                vals.append("–" if r is None else f"{100 * r['error']:.1f} ± {100 * np.nan_to_num(r['ci95']):.1f}")
            lines.append(f"| {labels[m]} | " + " | ".join(vals) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_error_vs_k(rows: list[dict[str, Any]], cfg: TransferConfig, path: Path) -> None:
    """Test error vs k (log scale), one line per method with 95% CI bars, one panel per n."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = method_labels(cfg)
    fig, axes = plt.subplots(1, len(cfg.ns), figsize=(5.5 * len(cfg.ns) + 3.2, 4.6), squeeze=False, sharey=True)
    markers = dict(zip(labels, "osD^vP"))
    for ax, n in zip(axes[0], cfg.ns):
        for i, m in enumerate(cfg.methods):
            pts = sorted((r["k"], r["error"], r["ci95"]) for r in rows if r["n"] == n and r["method"] == m)
            if not pts:
                continue
            k, err, ci = (np.asarray(v, dtype=float) for v in zip(*pts))
            dodge = 1 + 0.035 * (i - (len(cfg.methods) - 1) / 2)  # side by side, so the CI bars stay readable
            ax.errorbar(k * dodge, 100 * err, yerr=100 * np.nan_to_num(ci), marker=markers[m], capsize=3, lw=1.8,
                        ls="--" if m in ("baseline", "weight_transfer") else "-", label=labels[m])
        ax.set_xscale("log")
        ax.set_xticks(cfg.ks, [str(k) for k in cfg.ks])
        ax.minorticks_off()
        ax.set_xlabel("k (labelled examples per target class)")
        ax.set_title(f"{n}-way")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test error (%)")
    axes[0][0].set_ylim(bottom=0)
    axes[0][-1].legend(fontsize=8.5, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    d = cfg.source.data
    fig.suptitle(f"k-shot transfer on {d.name}: {d.train_split} classes → {d.test_split} classes "
                 f"({cfg.episodes} episodes, 95% CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
