"""The run report: loss curve, retrieval metrics over epochs, a t-SNE map, and ``report.html`` showing them."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from deepmetric.data.base import MetricDataset  # noqa: E402
from deepmetric.errors import DataError  # noqa: E402
from deepmetric.training.retrieval_figures import neighbours, plot_recall_at_k, plot_worst_queries, recall_curve  # noqa: E402
from deepmetric.training.runfolder import read_records  # noqa: E402

LEAD_METRICS = ("map@r", "r_precision", "recall@1", "recall@2", "recall@4", "recall@8", "nmi")
#: The report page's heading for each figure.
FIGURE_TITLES = {
    "metrics.png": "Retrieval metrics per epoch",
    "loss.png": "Training loss",
    "recall_at_k.png": "Recall@K on the test classes",
    "worst_queries.png": "The worst test queries and their nearest neighbours",
    "tsne.png": "t-SNE map of the test embeddings",
}


def selection_text(selected: dict[str, Any] | None) -> str:
    """One sentence saying which split chose the reported checkpoint."""
    if not selected:
        return "no checkpoint selection recorded"
    if selected["split"] == "last":
        return f"checkpoint: last epoch ({selected['epoch']}), no selection (fixed schedule)"
    text = (f"checkpoint: epoch {selected['epoch']}, best {selected['metric']} = {selected['value']:.4f} "
            f"on the {selected['split'].upper()} split")
    if selected["split"] == "val":
        return text + " (classes held out from training; the test classes were never used to choose it)"
    return text + " — WARNING: chosen on the test classes, so test figures are optimistic (Musgrave et al. 2020)"


def comparison_text(summary: dict[str, Any], metric: str = "map@r") -> str:
    """One sentence: the trained embedding's test ``metric`` against each baseline of the run (raw pixels,
    untrained network), with the difference, e.g. ``trained MAP@R 0.6569 vs raw pixels 0.6056 (+0.0513)``."""
    from deepmetric.training.grid import metric_label

    value = summary["test"][metric]
    against = [f"{name} {m[metric]:.4f} ({value - m[metric]:+.4f})"
               for name, m in summary.get("baselines", {}).items() if metric in m]
    return f"trained {metric_label(metric)} {value:.4f}" + (" vs " + ", ".join(against) if against else "")


def _plot_loss(records: list[dict], path: Path) -> None:
    rows = [r for r in records if "train/loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([r["epoch"] for r in rows], [r["train/loss"] for r in rows], marker="o", ms=3)
    ax.set(xlabel="epoch", ylabel="training loss (mean over the epoch)", title="Training loss")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_metrics(records: list[dict], selected: dict | None, baselines: dict[str, dict], path: Path) -> None:
    rows = [r for r in records if "test/map@r" in r]
    epochs = [r["epoch"] for r in rows]
    keys = [k for k in ("recall@1", "recall@2", "recall@4", "recall@8", "map@r") if f"test/{k}" in rows[0]]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        ax.plot(epochs, [r[f"test/{key}"] for r in rows], marker="o", ms=3, lw=2.5 if key == "map@r" else 1.2,
                label=f"test {key}")
    if any("val/map@r" in r for r in rows):
        ax.plot(epochs, [r.get("val/map@r", np.nan) for r in rows], ls="--", color="black", label="val map@r")
    for name, metrics in baselines.items():
        if name != "untrained network" and "map@r" in metrics:
            ax.axhline(metrics["map@r"], color="purple", ls="-.", lw=1, label=f"{name} map@r")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    if selected and selected.get("epoch") is not None:
        ax.axvline(selected["epoch"], color="grey", ls=":", label=f"selected (epoch {selected['epoch']})")
    ax.set(xlabel="epoch (0 = untrained)", ylabel="score", ylim=(0, 1.02),
           title="Retrieval on unseen classes (leave-one-out)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_tsne(embeddings: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str] | None, path: Path,
               max_points: int = 3000, seed: int = 0) -> None:
    from sklearn.manifold import TSNE

    x, y = embeddings.numpy(), labels.numpy()
    if len(x) > max_points:
        keep = np.random.default_rng(seed).choice(len(x), max_points, replace=False)
        x, y = x[keep], y[keep]
    xy = TSNE(n_components=2, init="pca", random_state=seed, perplexity=min(30, len(x) - 1)).fit_transform(x)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    classes = np.unique(y)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for i, c in enumerate(classes):
        m = y == c
        name = class_names[c] if class_names is not None and c < len(class_names) else str(c)
        ax.scatter(xy[m, 0], xy[m, 1], s=8, color=cmap(i % cmap.N), label=name if len(classes) <= 20 else None)
    if len(classes) <= 20:
        ax.legend(title="class", markerscale=2, fontsize=8, loc="best")
    ax.set(xticks=[], yticks=[], title="t-SNE of the test (unseen-class) embeddings")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(rows: dict[str, dict[str, float]]) -> str:
    cols = [k for k in LEAD_METRICS if any(k in r for r in rows.values())]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        f"<tr><td>{html.escape(name)}</td>" + "".join(f"<td>{m[c]:.4f}</td>" if c in m else "<td></td>" for c in cols)
        + "</tr>" for name, m in rows.items()
    )
    return f"<table><tr><th></th>{head}</tr>{body}</table>"


def _retrieval_figures(report: Path, embeddings: tuple[torch.Tensor, torch.Tensor], dataset: MetricDataset | None,
                       class_names: Sequence[str] | None, summary: dict) -> list[str]:
    """``recall_at_k.png`` (trained, raw pixels if the run compared them, untrained points) and
    ``worst_queries.png`` (when the test items can be drawn)."""
    x, y = embeddings
    distance = summary["config"]["eval"]["distance"]
    dist, idx, rel, n_rel = neighbours(x, y, distance)
    curves = {"trained embedding": recall_curve(rel)}
    baselines = summary.get("baselines", {})
    if "raw pixels" in baselines and hasattr(dataset, "raw_features"):
        curves["raw pixels"] = recall_curve(neighbours(dataset.raw_features(), y, distance)[2])
    untrained = {int(k.split("@")[1]): v for k, v in baselines.get("untrained network", {}).items()
                 if k.startswith("recall@")}
    plot_recall_at_k(curves, untrained, report / "recall_at_k.png")
    if dataset is None:
        return ["recall_at_k.png"]
    try:
        dataset.picture(0)
    except DataError:  # e.g. feature vectors: nothing to draw
        return ["recall_at_k.png"]
    plot_worst_queries(dataset, y, dist, idx, rel, n_rel, class_names, report / "worst_queries.png")
    return ["recall_at_k.png", "worst_queries.png"]


def write_report(out: Path, embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                 class_names: Sequence[str] | None = None, dataset: MetricDataset | None = None) -> Path:
    """Write ``out/report/{loss,metrics,recall_at_k,worst_queries,tsne}.png`` and ``report.html`` from the run
    folder; ``embeddings`` are the test items' (of ``dataset``, in order); return the HTML path."""
    out = Path(out)
    report = out / "report"
    report.mkdir(exist_ok=True)
    records = read_records(out)
    summary = json.loads((out / "summary.json").read_text())
    _plot_loss(records, report / "loss.png")
    _plot_metrics(records, summary.get("selected"), summary.get("baselines", {}), report / "metrics.png")
    images = ["metrics.png", "loss.png"]
    cfg = summary["config"]
    if embeddings is not None:
        images += _retrieval_figures(report, embeddings, dataset, class_names, summary)
        if cfg["eval"].get("tsne", True):
            _plot_tsne(*embeddings, class_names, report / "tsne.png")
            images.append("tsne.png")
    method = " + ".join(f"{t.get('weight', 1)}·{t['name']}" for t in cfg["objective"]) if cfg.get("objective") else cfg["loss"]["name"]
    rows = {**summary.get("baselines", {}), "trained (selected checkpoint)": summary["test"]}
    k = cfg["model"].get("members", 1)
    model = (f"<b>{k} x {html.escape(cfg['model']['backbone'])}</b> (a deep ensemble, one loss per network)" if k > 1
             else f"<b>{html.escape(cfg['model']['backbone'])}</b>")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>deepmetric run report</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}
.note{{background:#f4f4f4;padding:8px}}</style></head><body>
<h1>deepmetric run report</h1>
<p>Data set <b>{html.escape(cfg['data']['name'])}</b>, objective <b>{html.escape(method)}</b>,
backbone {model}, {cfg['model']['embedding_size']}-d embedding, {cfg['train']['epochs']} epochs.
Test = classes never seen in training; MAP@R leads because Recall@1 saturates early.</p>
<p class="note">{html.escape(selection_text(summary.get('selected')))}</p>
<p class="note">{html.escape(comparison_text(summary, cfg['train']['select_metric']))}</p>
<h2>Test metrics</h2>{_table(rows)}
{''.join(f'<h2>{html.escape(FIGURE_TITLES.get(i, i[:-4]))}</h2><img src="{i}" alt="{i}">' for i in images)}
</body></html>"""
    path = report / "report.html"
    path.write_text(page)
    return path
