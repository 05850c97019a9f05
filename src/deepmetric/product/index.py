"""A persisted faiss search index over a gallery of embeddings, with the items' ids, labels and paths.

**Kinds.** ``flat`` is exact search; ``hnsw`` (HNSW graph, Malkov & Yashunin 2018; ``HNSW32``) and
``ivfpq`` (inverted lists + product quantisation, Jégou et al. 2011) are approximate. ``auto`` picks
flat below :data:`HNSW_FROM` items, HNSW below :data:`IVFPQ_FROM`, IVF-PQ above. For an approximate
index, ``metadata["recall"]`` is its recall@:data:`RECALL_K` against exact search, measured at build
time with up to :data:`RECALL_QUERIES` of the items as queries (each query's own item left out).

**Distances.** ``cosine``: vectors are L2-normalised and searched by inner product (faiss
``METRIC_INNER_PRODUCT``); the distance is ``1 - cos`` (0 = same direction, 2 = opposite).
``euclidean``: faiss ``METRIC_L2``; the distance is the Euclidean (not squared) distance. Whatever the
kind, the candidates faiss returns are re-scored exactly from the stored vectors (IVF-PQ fetches 4x the
candidates), so reported distances, and thresholds on them, mean the same for every kind.

**On disk.** ``DIR/index.faiss`` (faiss), ``DIR/items.npz`` (vectors, ids, labels, paths) and
``DIR/metadata.json``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from deepmetric import data
from deepmetric.data.images import load_rgb
from deepmetric.errors import DataError, InputError, SearchIndexError, suggest
from deepmetric.evaluation.knn import check_distance
from deepmetric.product.store import Embeddings

if TYPE_CHECKING:
    from deepmetric.product.embedder import Embedder

KINDS = ("auto", "flat", "hnsw", "ivfpq")
HNSW_FROM = 50_000
IVFPQ_FROM = 2_000_000
RECALL_K = 10
RECALL_QUERIES = 1000
IVFPQ_CANDIDATES = 4
RESCORE_BUDGET = 256 * 2**20  # bytes of gathered candidate vectors per re-scoring chunk
FILES = ("index.faiss", "items.npz", "metadata.json")
REQUIRED = ("embedding_size", "distance", "normalize", "kind", "count")


@dataclass
class Hit:
    """The ``rank``-th (from 1) gallery item found for a query; ``match`` is ``distance <= threshold``
    when a threshold is given or stored, else None."""

    rank: int
    id: str
    label: int | None
    path: str | None
    distance: float
    match: bool | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _operands(x: np.ndarray, distance: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if distance == "cosine":
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def choose_kind(count: int) -> str:
    """``auto``'s choice for ``count`` items."""
    return "flat" if count < HNSW_FROM else "hnsw" if count < IVFPQ_FROM else "ivfpq"


def _factory(kind: str, n: int, d: int) -> tuple[str, dict[str, int]]:
    """The faiss factory string and search parameters of ``kind`` for ``n`` vectors of size ``d``."""
    if kind == "flat":
        return "Flat", {}
    if kind == "hnsw":
        return "HNSW32", {"efConstruction": 80, "efSearch": 64}
    nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))  # faiss wants >= 39 training points per list
    m = max(s for s in range(1, min(d, 64) + 1) if d % s == 0 and (d // s >= 2 or d == 1))
    nbits = max(1, min(8, int(math.log2(max(n // 39, 2)))))  # >= 39 points per PQ centroid
    return f"IVF{nlist},PQ{m}x{nbits}", {"nprobe": min(nlist, 16)}


def _apply_params(index, params: dict[str, int]) -> None:
    import faiss

    if "efSearch" in params:
        faiss.downcast_index(index).hnsw.efSearch = params["efSearch"]
    if "nprobe" in params:
        faiss.extract_index_ivf(index).nprobe = params["nprobe"]


def _check_k(k) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError(f"k must be a positive integer (how many neighbours to return), got {k!r}")


class SearchIndex:
    """Gallery embeddings in a faiss index. ``metadata`` holds ``embedding_size``, ``distance``, ``normalize``,
    ``kind``, ``count``, ``run`` (the embedder's source), ``config``, ``data`` (name, split, root), ``input``,
    ``threshold`` (or None), ``calibration`` (how it was chosen, or None), ``recall`` / ``recall_k`` (approximate
    vs exact at build time; None for flat) and the faiss ``factory`` / search ``params``."""

    def __init__(self, index, vectors: np.ndarray, ids: list[str], labels: np.ndarray | None,
                 paths: list[str] | None, metadata: dict[str, Any]):
        self._index, self.vectors, self.ids = index, vectors, list(ids)
        self.labels, self.paths, self.metadata = labels, paths, metadata
        self._ops = _operands(vectors, metadata["distance"])
        self._rows = {item: i for i, item in enumerate(self.ids)}
        self._dataset = None

    # ----------------------------------------------------------------- building
    @classmethod
    def build(cls, embeddings: np.ndarray, ids, labels=None, paths=None, metadata: dict[str, Any] | None = None,
              kind: str = "auto") -> SearchIndex:
        """Index ``embeddings [N, D]`` (items ``ids``, optional ``labels`` / ``paths``); ``metadata`` carries the
        embeddings file's (``distance`` default cosine, ``normalize`` default: whether every row has norm 1)."""
        import faiss

        items = Embeddings(embeddings, ids, labels, paths)  # validates shapes, ids, labels
        if kind not in KINDS:
            raise SearchIndexError(f"unknown index kind {kind!r}.{suggest(kind, KINDS)} Valid: {', '.join(KINDS)}")
        if len(items) == 0:
            raise SearchIndexError("no embeddings to index")
        meta = dict(metadata or {})
        distance = check_distance(meta.get("distance", "cosine"))
        n, d = items.vectors.shape
        if meta.get("embedding_size", d) != d:
            raise SearchIndexError(f"the metadata says embedding_size {meta['embedding_size']} but the vectors have {d}")
        kind = choose_kind(n) if kind == "auto" else kind
        factory, params = _factory(kind, n, d)
        metric = faiss.METRIC_INNER_PRODUCT if distance == "cosine" else faiss.METRIC_L2
        ops = _operands(items.vectors, distance)
        index = faiss.index_factory(d, factory, metric)
        if "efConstruction" in params:
            faiss.downcast_index(index).hnsw.efConstruction = params["efConstruction"]
        if not index.is_trained:
            index.train(ops)
        index.add(ops)
        _apply_params(index, params)
        norms = np.linalg.norm(items.vectors, axis=1)
        meta.update(embedding_size=d, distance=distance, kind=kind, count=n, factory=factory, params=params,
                    normalize=bool(meta.get("normalize", np.allclose(norms, 1.0, atol=1e-4))))
        for key in ("run", "config", "data", "input", "threshold", "calibration"):
            meta.setdefault(key, None)
        built = cls(index, items.vectors, items.ids, items.labels, items.paths, meta)
        meta["recall"], meta["recall_k"] = (None, None) if kind == "flat" else built._measure_recall()
        return built

    @classmethod
    def from_embeddings(cls, embeddings: Embeddings, kind: str = "auto") -> SearchIndex:
        """:meth:`build` from an embeddings file's contents, carrying its metadata."""
        return cls.build(embeddings.vectors, embeddings.ids, embeddings.labels, embeddings.paths,
                         embeddings.metadata, kind)

    def _measure_recall(self, seed: int = 0) -> tuple[float, int]:
        """Recall@k of this index against exact search, queries = a sample of the items (themselves left out)."""
        import faiss

        n = len(self)
        k = min(RECALL_K, n - 1)
        if k < 1:
            return 1.0, 0
        rows = np.sort(np.random.default_rng(seed).choice(n, min(RECALL_QUERIES, n), replace=False))
        exact = faiss.IndexFlat(self._ops.shape[1], self._index.metric_type)
        exact.add(self._ops)
        _, truth = exact.search(self._ops[rows], k + 1)
        _, found = self._nearest(self._ops[rows], k + 1)

        def others(found_rows: np.ndarray) -> np.ndarray:  # each row's first k results that are not the query
            keep = found_rows != rows[:, None]
            order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
            return np.where(np.take_along_axis(keep, order, 1), np.take_along_axis(found_rows, order, 1), -1)

        a, b = others(found), others(truth)
        hits = (a[:, :, None] == b[:, None, :]) & (a[:, :, None] >= 0)
        return float(hits.any(2).sum(1).mean() / k), k

    # ----------------------------------------------------------------- persistence
    def save(self, directory: str | Path) -> Path:
        """Write ``index.faiss``, ``items.npz`` and ``metadata.json`` into ``directory``."""
        import faiss

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self._index, str(directory / "index.faiss"))
        arrays = {"vectors": self.vectors, "ids": np.asarray(self.ids, dtype=str)}
        if self.labels is not None:
            arrays["labels"] = self.labels
        if self.paths is not None:
            arrays["paths"] = np.asarray(self.paths, dtype=str)
        np.savez(directory / "items.npz", **arrays)
        (directory / "metadata.json").write_text(json.dumps(self.metadata, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> SearchIndex:
        """Read an index written by :meth:`save`; a clear :class:`SearchIndexError` if anything is off."""
        import faiss

        directory = Path(directory)
        hint = f"build one with `deepmetric index EMBEDDINGS --out {directory}`"
        if not directory.is_dir():
            raise SearchIndexError(f"no index folder at {directory}: {hint}")
        missing = [f for f in FILES if not (directory / f).is_file()]
        if missing:
            raise SearchIndexError(f"{directory} is not a complete index (missing {', '.join(missing)}): {hint}")
        try:
            meta = json.loads((directory / "metadata.json").read_text())
        except json.JSONDecodeError as exc:
            raise SearchIndexError(f"{directory / 'metadata.json'} is not valid JSON ({exc}): {hint}") from exc
        lacking = [k for k in REQUIRED if not isinstance(meta, dict) or k not in meta]
        if lacking:
            raise SearchIndexError(f"{directory / 'metadata.json'} lacks {', '.join(lacking)}: {hint}")
        try:
            index = faiss.read_index(str(directory / "index.faiss"))
            with np.load(directory / "items.npz", allow_pickle=False) as z:
                vectors, ids = z["vectors"], z["ids"].tolist()
                labels = z["labels"] if "labels" in z else None
                paths = z["paths"].tolist() if "paths" in z else None
        except (RuntimeError, OSError, ValueError, KeyError) as exc:
            raise SearchIndexError(f"cannot read the index in {directory} ({exc}): {hint}") from exc
        if not (index.ntotal == len(vectors) == len(ids) == meta["count"]) or index.d != meta["embedding_size"]:
            raise SearchIndexError(
                f"{directory} is inconsistent: faiss holds {index.ntotal} vectors of size {index.d}, items.npz "
                f"{len(ids)}, metadata.json {meta['count']} of size {meta['embedding_size']}: {hint}")
        _apply_params(index, meta.get("params", {}))
        return cls(index, vectors, ids, labels, paths, meta)

    # ----------------------------------------------------------------- queries
    def __len__(self) -> int:
        return len(self.ids)

    def _nearest(self, ops: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact distances ``[q, k]`` (ascending) and rows of the ``k`` best candidates faiss finds."""
        factor = IVFPQ_CANDIDATES if self.metadata["kind"] == "ivfpq" else 1
        _, cand = self._index.search(ops, min(len(self), k * factor))
        gallery = torch.from_numpy(self._ops)
        rows = max(1, RESCORE_BUDGET // (4 * cand.shape[1] * ops.shape[1]))  # [rows, c, D] gathered at a time
        dist = np.empty(cand.shape, np.float32)
        for start in range(0, len(ops), rows):
            q = torch.from_numpy(ops[start : start + rows])
            g = gallery[torch.from_numpy(cand[start : start + rows]).clamp_min(0)]
            if self.metadata["distance"] == "cosine":
                dist[start : start + rows] = (1.0 - torch.einsum("qd,qcd->qc", q, g)).clamp_min_(0.0).numpy()
            else:
                dist[start : start + rows] = (q[:, None, :] - g).pow(2).sum(-1).sqrt().numpy()
        dist[cand < 0] = np.inf
        order = np.lexsort((cand, dist), axis=1)[:, :k]  # by distance, then row (ties: lower row first)
        return np.take_along_axis(dist, order, 1), np.take_along_axis(cand, order, 1)

    def search(self, queries: np.ndarray, k: int, threshold: float | None = None) -> list[list[Hit]]:
        """The ``k`` nearest items of each query (``[D]`` or ``[n, D]``), nearest first; ``k`` above the
        index size returns every item. ``threshold`` (else the stored one) sets each hit's ``match``."""
        _check_k(k)
        q = np.asarray(queries, dtype=np.float32)
        q = q[None] if q.ndim == 1 else q
        d = self.metadata["embedding_size"]
        if q.ndim != 2 or q.shape[1] != d:
            raise SearchIndexError(f"queries of shape {tuple(np.shape(queries))} do not fit this index of "
                                   f"{d}-dimensional embeddings: embed them with the model the index was built from")
        if not np.isfinite(q).all():
            raise InputError("queries contain NaN or Inf")
        threshold = self.metadata.get("threshold") if threshold is None else float(threshold)
        dist, rows = self._nearest(_operands(q, self.metadata["distance"]), min(int(k), len(self)))
        return [[self._hit(r + 1, int(row), float(dist_), threshold) for r, (row, dist_) in enumerate(zip(rs, ds))
                 if row >= 0] for rs, ds in zip(rows, dist)]

    def search_ids(self, ids, k: int, threshold: float | None = None) -> list[list[Hit]]:
        """The ``k`` nearest *other* items of each stored item in ``ids``: an item is no answer to its own
        query, so it is left out and the ranks start at the next one (``deepmetric search --id``, ``match
        --id`` and the server's search by id all use this)."""
        _check_k(k)
        ids = [str(i) for i in ids]
        found = self.search(np.stack([self.vector(i) for i in ids]), int(k) + 1, threshold)
        return [[replace(h, rank=rank) for rank, h in enumerate((h for h in hs if h.id != i), start=1)][:k]
                for i, hs in zip(ids, found)]

    def _hit(self, rank: int, row: int, distance: float, threshold: float | None) -> Hit:
        return Hit(rank, self.ids[row], None if self.labels is None else int(self.labels[row]),
                   None if self.paths is None else self.paths[row], distance,
                   None if threshold is None else bool(distance <= threshold))

    def _row(self, id: str) -> int:
        try:
            return self._rows[str(id)]
        except KeyError:
            raise InputError(f"no item {id!r} in this index (ids look like {self.ids[0]!r})."
                             f"{suggest(str(id), self.ids[:10_000])}") from None

    def vector(self, id: str) -> np.ndarray:
        """The stored embedding ``[D]`` of item ``id`` (to search by id)."""
        return self.vectors[self._row(id)].copy()

    def check_compatible(self, embedder: Embedder) -> None:
        """Raise :class:`SearchIndexError` if ``embedder``'s embeddings differ in size, distance or normalisation."""
        ours = {k: self.metadata[k] for k in ("embedding_size", "distance", "normalize")}
        theirs = {"embedding_size": embedder.embedding_size, "distance": embedder.distance,
                  "normalize": embedder.normalize}
        diffs = [f"{k} {ours[k]!r} (index) vs {theirs[k]!r} (model)" for k in ours if ours[k] != theirs[k]]
        if diffs:
            raise SearchIndexError(f"the model does not fit this index: {'; '.join(diffs)}. Search with the model "
                                   "the index was built from, or rebuild it: `deepmetric embed` then `deepmetric index`")

    def image(self, id: str) -> Image.Image:
        """Item ``id`` as a picture: its file, or drawn by the data set named in ``metadata["data"]`` (digits:
        upscaled 8x8) for data sets without files; ids from ``deepmetric embed`` are ``<split>/<index>``."""
        row = self._row(id)
        if self.paths is not None:
            return load_rgb(self.paths[row])
        desc = self.metadata.get("data")
        match = re.fullmatch(rf"{re.escape(desc['split'])}/(\d+)", self.ids[row]) if desc else None
        if match is None:
            raise DataError(f"item {id!r} has no image file and the index names no data set to draw it from")
        if self._dataset is None:
            extra = {"augment": False} if "augment" in data.DATASETS.parameters(desc["name"]) else {}
            self._dataset = data.build(desc["name"], root=desc["root"], split=desc["split"],
                                       **desc.get("kwargs", {}), **extra)
        return self._dataset.picture(int(match.group(1)))
