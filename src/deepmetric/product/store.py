"""Embeddings files: vectors with their sample ids, labels, paths and where they came from.

Formats, by suffix:

- ``.npz``: arrays ``embeddings`` [N, D] float32, ``ids`` (str), optional ``labels`` (int64) and ``paths``
  (str), and ``metadata`` (a JSON string);
- ``.parquet``: one row per item, columns ``id``, ``label`` (nullable), ``path`` (nullable) and ``embedding``
  (fixed-size list of float32); the metadata JSON in the schema metadata under ``deepmetric``;
- ``.npy``: the bare [N, D] array, with ``FILE.npy.json`` beside it holding ids, labels, paths and metadata;
  a ``.npy`` without that file (someone else's array) reads with ids ``"0" .. "N-1"`` and no labels.

Metadata (written by ``deepmetric embed``): ``embedding_size``, ``distance``, ``normalize``, ``run`` (the
embedder's source), ``config`` (the run's resolved config), ``data`` (name, split, root), ``input`` (how
pictures become inputs, :mod:`deepmetric.product.inputs`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deepmetric.errors import DataError

FORMATS = (".npz", ".parquet", ".npy")


@dataclass
class Embeddings:
    """``vectors[i]`` is the embedding of item ``ids[i]`` (label ``labels[i]``, file ``paths[i]``)."""

    vectors: np.ndarray
    ids: list[str]
    labels: np.ndarray | None = None
    paths: list[str] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.vectors = np.ascontiguousarray(self.vectors, dtype=np.float32)
        if self.vectors.ndim != 2:
            raise DataError(f"embeddings must be a 2-D array [items, dimensions], got shape {self.vectors.shape}")
        n = len(self.vectors)
        self.ids = [str(i) for i in self.ids]
        if len(self.ids) != n:
            raise DataError(f"{len(self.ids)} ids for {n} embeddings: give one id per row")
        if len(set(self.ids)) != n:
            values, counts = np.unique(np.asarray(self.ids, dtype=str), return_counts=True)
            raise DataError(f"ids must be unique; repeated: {', '.join(values[counts > 1][:5])}")
        if self.labels is not None:
            labels = np.asarray(self.labels)
            if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
                raise DataError(f"labels must be {n} integers, got {labels.dtype} of shape {labels.shape}")
            self.labels = labels.astype(np.int64)
        if self.paths is not None:
            self.paths = [str(p) for p in self.paths]
            if len(self.paths) != n:
                raise DataError(f"{len(self.paths)} paths for {n} embeddings: give one path per row")
        if not np.isfinite(self.vectors).all():
            raise DataError("embeddings contain NaN or Inf")

    def __len__(self) -> int:
        return len(self.vectors)

    def save(self, path: str | Path) -> Path:
        """Write to ``path`` in the format its suffix names (``.npz``, ``.parquet``, ``.npy``)."""
        path = Path(path)
        check_suffix(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".npz":
            arrays = {"embeddings": self.vectors, "ids": np.asarray(self.ids, dtype=str),
                      "metadata": np.asarray(json.dumps(self.metadata))}
            if self.labels is not None:
                arrays["labels"] = self.labels
            if self.paths is not None:
                arrays["paths"] = np.asarray(self.paths, dtype=str)
            with path.open("wb") as f:  # a file object: np.savez would append .npz to other names
                np.savez(f, **arrays)
        elif path.suffix == ".parquet":
            _write_parquet(self, path)
        else:
            np.save(path, self.vectors)
            side = {"ids": self.ids, "labels": None if self.labels is None else self.labels.tolist(),
                    "paths": self.paths, "metadata": self.metadata}
            _sidecar(path).write_text(json.dumps(side))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Embeddings:
        """Read a file written by :meth:`save` (or a bare ``.npy`` array)."""
        path = Path(path)
        check_suffix(path)
        if not path.is_file():
            raise DataError(f"embeddings file not found: {path} (write one with `deepmetric embed RUN --out {path}`)")
        try:
            if path.suffix == ".npz":
                with np.load(path, allow_pickle=False) as z:
                    if "embeddings" not in z:
                        raise DataError(f"{path} has no 'embeddings' array (arrays: {', '.join(z.files)})")
                    vectors = z["embeddings"]
                    ids = z["ids"].tolist() if "ids" in z else [str(i) for i in range(len(vectors))]
                    return cls(vectors, ids, z["labels"] if "labels" in z else None,
                               z["paths"].tolist() if "paths" in z else None,
                               json.loads(str(z["metadata"])) if "metadata" in z else {})
            if path.suffix == ".parquet":
                return _read_parquet(path)
            vectors = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            if isinstance(exc, DataError):
                raise
            raise DataError(f"cannot read embeddings file {path}: {exc}") from exc
        side = _sidecar(path)
        if not side.is_file():
            return cls(vectors, [str(i) for i in range(len(vectors))])
        meta = json.loads(side.read_text())
        labels = meta.get("labels")
        return cls(vectors, meta["ids"], None if labels is None else np.asarray(labels, dtype=np.int64),
                   meta.get("paths"), meta.get("metadata", {}))


def check_suffix(path: Path) -> None:
    """Refuse a file name whose suffix names no embeddings format."""
    if path.suffix not in FORMATS:
        raise DataError(f"embeddings file {path} must end in one of {', '.join(FORMATS)} (the suffix picks the format)")


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _write_parquet(e: Embeddings, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, d = e.vectors.shape
    flat = pa.array(e.vectors.reshape(-1), type=pa.float32())
    columns = {
        "id": pa.array(e.ids, type=pa.string()),
        "label": pa.array(e.labels if e.labels is not None else [None] * n, type=pa.int64()),
        "path": pa.array(e.paths if e.paths is not None else [None] * n, type=pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(flat, d),
    }
    table = pa.table(columns).replace_schema_metadata({"deepmetric": json.dumps(e.metadata)})
    pq.write_table(table, path)


def _read_parquet(path: Path) -> Embeddings:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    missing = {"id", "embedding"} - set(table.column_names)
    if missing:
        raise DataError(f"{path} lacks the column(s) {', '.join(sorted(missing))} (has {', '.join(table.column_names)})")
    column = table.column("embedding").combine_chunks()
    d = column.type.list_size if hasattr(column.type, "list_size") else None
    if d is None:
        raise DataError(f"{path}: column 'embedding' must be a fixed-size list of floats, got {column.type}")
    vectors = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, d)
    labels = table.column("label") if "label" in table.column_names else None
    paths = table.column("path") if "path" in table.column_names else None
    if labels is not None and 0 < labels.null_count < len(labels):
        raise DataError(f"{path}: {labels.null_count} of {len(labels)} labels are missing; give all or none")
    raw = (table.schema.metadata or {}).get(b"deepmetric")
    return Embeddings(
        vectors, table.column("id").to_pylist(),
        None if labels is None or labels.null_count == len(labels) else np.asarray(labels.to_pylist(), dtype=np.int64),
        None if paths is None or paths.null_count == len(paths) else paths.to_pylist(),
        json.loads(raw) if raw else {},
    )
