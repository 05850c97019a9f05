"""``evaluate``: every retrieval and clustering metric from embeddings and labels in one call."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import torch

from deepmetric.errors import ConfigError, InputError, LabelError, suggest
from deepmetric.evaluation import clustering, retrieval
from deepmetric.evaluation.knn import (
    DEFAULT_MEMORY_BUDGET,
    check_distance,
    check_k,
    chunk_rows,
    knn,
    parse_memory_budget,
    resolve_backend,
    score_chunks,
    score_operands,
    topk_scores,
)
from deepmetric.validation import as_int_labels, check_embeddings

RETRIEVAL_AT_K = ("recall@k", "precision@k", "ndcg@k")
RETRIEVAL = (*RETRIEVAL_AT_K, "r_precision", "map@r", "map")
CLUSTERING = ("nmi", "ami", "f1")
METRICS = (*RETRIEVAL, *CLUSTERING)
LONE_QUERIES = ("skip", "miss")
_AP_BYTES = 16  # per selected score in the full-ranking AP pass (partition copy, sort)


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            raise InputError(f"{name} must be floating point, got {x.dtype}")
        x = torch.from_numpy(x)
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.ndim == 2 and x.shape[0] == 0:
            raise InputError(f"{name} is empty (0 rows); evaluation needs at least 2 items")
    return check_embeddings(x, name)


def _labels(labels, n: int, name: str) -> np.ndarray:
    y = as_int_labels(labels, name)
    if y.shape[0] != n:
        raise LabelError(f"{name} has {y.shape[0]} entries but there are {n} embeddings")
    return y


def parse_metrics(metrics, ks) -> tuple[set[str], tuple[int, ...]]:
    """Metric families and the K values to report. ``recall@k`` means every K in ``ks``;
    ``recall@4`` adds K = 4 only (with ``ks`` left out of it unless another ``@k`` name asks)."""
    if metrics is None:
        return set(METRICS), tuple(ks)
    names = [metrics] if isinstance(metrics, str) else list(metrics)
    families, extra, all_k = set(), [], False
    for raw in names:
        name = str(raw).lower().strip()
        m = re.fullmatch(r"(recall|precision|ndcg)@(\d+)", name)
        if m:
            families.add(f"{m.group(1)}@k")
            extra.append(int(m.group(2)))
        elif name in METRICS:
            families.add(name)
            all_k |= name in RETRIEVAL_AT_K
        else:
            raise ConfigError(
                f"unknown metric {raw!r}; valid: {', '.join(METRICS)} (or e.g. 'recall@1').{suggest(name, METRICS)}"
            )
    chosen = sorted(set(extra) | (set(ks) if all_k else set()))
    return families, tuple(chosen)


def _check_ks(ks) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ConfigError(f"ks must be positive integers, e.g. (1, 2, 4, 8); got {ks!r}")
    return tuple(sorted({int(k) for k in ks}))


def _per_query(rel: torch.Tensor, n_rel: torch.Tensor, families: set[str], ks) -> dict[str, torch.Tensor]:
    out = {}
    if "recall@k" in families:
        out.update({f"recall@{k}": retrieval.recall_at_k(rel, k) for k in ks})
    if "precision@k" in families:
        out.update({f"precision@{k}": retrieval.precision_at_k(rel, k) for k in ks})
    if "ndcg@k" in families:
        out.update({f"ndcg@{k}": retrieval.ndcg_at_k(rel, n_rel, k) for k in ks})
    if "r_precision" in families:
        out["r_precision"] = retrieval.r_precision(rel, n_rel)
    if "map@r" in families:
        out["map@r"] = retrieval.map_at_r(rel, n_rel)
    return out


def _ranking_pass(q, g, q_codes, g_codes, n_classes, n_rel, k, families, ks, distance, budget, backend):
    """Per-query retrieval values. ``map`` needs every score, so it runs the chunked pass, which also
    yields the top-k (selected by faiss heaps for the faiss backend); otherwise :func:`knn`."""
    loo = g is None
    gal = q if loo else g
    if "map" not in families:
        idx = knn(q, g, k, distance=distance, backend=backend, memory_budget=budget).indices if k else None
        rel = g_codes[idx] == q_codes.unsqueeze(1) if k else q_codes.new_zeros((len(q_codes), 0), dtype=torch.bool)
        return _per_query(rel, n_rel, families, ks)
    q_op, g_op = score_operands(q, distance, "query"), score_operands(gal, distance, "gallery")
    ptr = torch.cat([g_codes.new_zeros(1), torch.bincount(g_codes, minlength=n_classes).cumsum(0)])
    by_class = torch.argsort(g_codes, stable=True)
    # per score: 12 bytes, plus ~40 bytes per relevant pair (pairs, padded ranks) when classes are big
    rows = chunk_rows(gal.shape[0], budget, 12 + math.ceil(40 * int(n_rel.max()) / gal.shape[0]))
    parts = []
    for start, s in score_chunks(q_op, g_op, exclude_self=loo, rows=rows):
        stop = start + s.shape[0]
        qc = q_codes[start:stop]
        if k:
            heaps = backend == "faiss" and s.device.type == "cpu"
            rel = g_codes[topk_scores(s, k, heaps=heaps)[1]] == qc.unsqueeze(1)
        else:
            rel = qc.new_zeros((len(qc), 0), dtype=torch.bool)
        values = _per_query(rel, n_rel[start:stop], families, ks)
        self_index = torch.arange(start, stop, device=s.device) if loo else None
        pairs = retrieval.relevant_pairs(qc, by_class, ptr, self_index)
        values["map"] = retrieval.average_precision(s, pairs, n_rel[start:stop], budget // _AP_BYTES)
        parts.append(values)
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def evaluate(
    embeddings,
    labels,
    *,
    query_embeddings=None,
    query_labels=None,
    metrics=None,
    ks=(1, 2, 4, 8),
    distance: str = "cosine",
    backend: str = "auto",
    memory_budget: int | str = DEFAULT_MEMORY_BUDGET,
    lone_queries: str = "skip",
    kmeans_seed: int = 0,
    nmi_average: str = "arithmetic",
    per_class: bool = False,
) -> dict[str, float]:
    """Retrieval and clustering metrics of embeddings (torch tensors or numpy arrays, any device).

    Without ``query_*`` the set is evaluated leave-one-out (each item queries all others, itself
    excluded by index); with them, queries search the gallery ``embeddings``. Neighbours are ranked by
    (distance asc, gallery index asc) — see :mod:`deepmetric.evaluation.knn`. Retrieval metrics
    (:mod:`~deepmetric.evaluation.retrieval`) are averaged over queries; queries with no relevant
    gallery item are dropped (``lone_queries="skip"``, as pytorch-metric-learning does) or scored 0
    (``"miss"``), and their number is reported as ``n_lone_queries``. Clustering metrics
    (:mod:`~deepmetric.evaluation.clustering`) come from seeded k-means on the gallery with k = its
    number of classes. ``metrics`` picks a subset of :data:`METRICS` (``"recall@k"`` = every K in
    ``ks``, ``"recall@1"`` = just K = 1); ``per_class=True`` adds ``"<metric>/class=<label>"`` entries.
    """
    check_distance(distance)
    if lone_queries not in LONE_QUERIES:
        raise ConfigError(f"lone_queries must be one of {LONE_QUERIES}, got {lone_queries!r}")
    families, ks = parse_metrics(metrics, _check_ks(ks))
    budget = parse_memory_budget(memory_budget)
    g = _as_tensor(embeddings, "embeddings")
    backend = resolve_backend(backend, g.device)
    y_g = _labels(labels, g.shape[0], "labels")
    if (query_embeddings is None) != (query_labels is None):
        raise InputError("give both query_embeddings and query_labels, or neither (leave-one-out)")
    loo = query_embeddings is None
    if loo:
        q, y_q = g, y_g
    else:
        q = _as_tensor(query_embeddings, "query_embeddings")
        y_q = _labels(query_labels, q.shape[0], "query_labels")
        if q.shape[1] != g.shape[1]:
            raise InputError(f"query_embeddings have {q.shape[1]} dimensions but embeddings have {g.shape[1]}")
    classes, codes = np.unique(np.concatenate([y_q, y_g]), return_inverse=True)
    device = g.device
    q_codes = torch.from_numpy(codes[: len(y_q)]).to(device)
    g_codes = torch.from_numpy(codes[len(y_q) :]).to(device)
    n_rel = torch.bincount(g_codes, minlength=len(classes))[q_codes] - int(loo)
    results: dict[str, float] = {}
    if families & set(RETRIEVAL):
        if loo and g.shape[0] < 2:
            raise InputError("leave-one-out evaluation needs at least 2 items")
        k = max(ks) if families & set(RETRIEVAL_AT_K) else 0
        if k:
            check_k(k, g.shape[0], loo)
        if families & {"r_precision", "map@r"}:
            k = max(k, int(n_rel.max()))
        values = _ranking_pass(
            q, None if loo else g, q_codes, g_codes, len(classes), n_rel, k, families, ks, distance, budget, backend
        )
        results.update(_summarise(values, n_rel, q_codes, classes, lone_queries, per_class))
    if families & set(CLUSTERING):
        x = score_operands(g, distance, "query")[:, : g.shape[1]].cpu().numpy()
        names = [m for m in CLUSTERING if m in families]
        results.update(clustering.clustering_metrics(x, y_g, seed=kmeans_seed, average=nmi_average, names=names))
    return results


def _summarise(values, n_rel, q_codes, classes, lone_queries, per_class) -> dict[str, float]:
    lone = n_rel == 0
    n_lone = int(lone.sum())
    weight = (~lone).double() if lone_queries == "skip" else torch.ones_like(n_rel, dtype=torch.float64)
    total = float(weight.sum())
    if total == 0:
        warnings.warn(
            "every query is lone (no other item of its class); retrieval metrics are NaN", RuntimeWarning, stacklevel=3
        )
    out: dict[str, float] = {}
    for key, v in values.items():
        out[key] = float((v * weight).sum()) / total if total else float("nan")
    out["n_lone_queries"] = n_lone
    if per_class:
        n_cls = len(classes)
        count = torch.zeros(n_cls, dtype=torch.float64, device=weight.device).index_add_(0, q_codes, weight)
        present = (count > 0).nonzero().squeeze(1).tolist()
        for key, v in values.items():
            sums = torch.zeros(n_cls, dtype=torch.float64, device=weight.device).index_add_(0, q_codes, v * weight)
            mean = (sums / count.clamp_min(1)).tolist()
            out.update({f"{key}/class={classes[c]}": mean[c] for c in present})
    return out
