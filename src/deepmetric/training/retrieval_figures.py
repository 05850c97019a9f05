"""The report's retrieval figures: a Recall@K curve and a gallery of the worst queries with their neighbours.

Both come from one exact leave-one-out kNN pass over the test embeddings (the ``R`` nearest of each query,
``R`` = the other items of its class, capped at :data:`MAX_NEIGHBOURS`; at least :data:`MAX_K`).
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from deepmetric.evaluation.knn import knn  # noqa: E402
from deepmetric.evaluation.retrieval import map_at_r  # noqa: E402

MAX_K = 32
MAX_NEIGHBOURS = 1000
WORST = 8
SHOWN = 5


def neighbours(embeddings: torch.Tensor, labels: torch.Tensor, distance: str):
    """``(distances, indices, relevant, n_rel)`` of each item's nearest others (leave-one-out)."""
    n_rel = torch.unique(labels, return_inverse=True, return_counts=True)
    n_rel = n_rel[2][n_rel[1]] - 1
    k = max(1, min(len(labels) - 1, max(MAX_K, int(n_rel.max())), MAX_NEIGHBOURS))
    nn = knn(embeddings.float(), None, k, distance=distance)
    return nn.distances, nn.indices, labels[nn.indices] == labels[:, None], n_rel


def recall_curve(relevant: torch.Tensor) -> np.ndarray:
    """Recall@K for K = 1 .. min(MAX_K, neighbours): the fraction of queries with a relevant item in the top K."""
    return relevant[:, :MAX_K].cummax(dim=1).values.double().mean(0).numpy()


def plot_recall_at_k(curves: dict[str, np.ndarray], untrained: dict[int, float], path) -> None:
    """One line per embedding (``curves``), the untrained network's recorded Recall@K as points."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for (name, curve), style in zip(curves.items(), ("-", "--", ":")):
        ax.plot(np.arange(1, len(curve) + 1), curve, style, marker="o", ms=3, label=name)
    if untrained:
        ax.plot(list(untrained), list(untrained.values()), "s", color="grey", label="untrained network")
    ax.set_xscale("log", base=2)
    longest = max(len(c) for c in curves.values())
    ax.set_xticks([k for k in (1, 2, 4, 8, 16, 32, 64) if k <= longest])
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    lowest = min([float(c.min()) for c in curves.values()] + list(untrained.values()))
    ax.set(xlabel="K (neighbours retrieved, log scale)", ylabel="Recall@K (a same-class item in the top K)",
           ylim=(max(0.0, np.floor((lowest - 0.02) * 20) / 20), 1.005),
           title="Recall@K on the test classes (leave-one-out)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def worst_queries(distances: torch.Tensor, indices: torch.Tensor, relevant: torch.Tensor, n_rel: torch.Tensor,
                  count: int = WORST) -> tuple[np.ndarray, np.ndarray]:
    """The ``count`` queries of lowest MAP@R (ties: lower index first) and their MAP@R."""
    scores = map_at_r(relevant, n_rel).numpy()
    order = np.argsort(scores, kind="stable")[:count]
    return order, scores[order]


def plot_worst_queries(dataset, labels: torch.Tensor, distances: torch.Tensor, indices: torch.Tensor,
                       relevant: torch.Tensor, n_rel: torch.Tensor, class_names: Sequence[str] | None, path) -> None:
    """Rows: a worst query (blue) and its nearest test items, framed green (same class) or red, with distances."""
    rows, scores = worst_queries(distances, indices, relevant, n_rel)
    shown = min(SHOWN, indices.shape[1])
    name = (lambda c: class_names[c] if class_names is not None and c < len(class_names) else str(c))  # noqa: E731
    fig, axes = plt.subplots(len(rows), shown + 1, figsize=(1.45 * (shown + 1), 1.6 * len(rows)), squeeze=False)
    for ax_row, q, score in zip(axes, rows, scores):
        cells = [(int(q), "tab:blue", f"query: {name(int(labels[q]))}\nMAP@R {score:.2f}")]
        cells += [(int(indices[q, j]), "tab:green" if relevant[q, j] else "tab:red",
                   f"{name(int(labels[indices[q, j]]))}  d={float(distances[q, j]):.3f}") for j in range(shown)]
        for ax, (item, colour, text) in zip(ax_row, cells):
            ax.imshow(np.asarray(dataset.picture(item)))
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set(color=colour, linewidth=4)
            ax.set_title(text, fontsize=7, color=colour)
    fig.suptitle(f"The {len(rows)} test queries with the lowest MAP@R and their {shown} nearest neighbours "
                 "(green: same class, red: other class, d: distance)", fontsize=9, y=1 - 0.12 / fig.get_figheight())
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.01, top=1 - 0.7 / fig.get_figheight(), hspace=0.45,
                        wspace=0.1)  # fixed margins: tight_layout over 48 axes costs about as much as the drawing
    fig.savefig(path, dpi=110)
    plt.close(fig)
