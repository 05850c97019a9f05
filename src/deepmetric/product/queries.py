"""Query vectors for an index: pictures (embedded by the index's model), an embeddings file, or stored ids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from deepmetric.data.images import load_rgb
from deepmetric.errors import InputError, SearchIndexError
from deepmetric.product.embedder import Embedder, load_embedder
from deepmetric.product.index import SearchIndex
from deepmetric.product.store import Embeddings


def index_embedder(index: SearchIndex, model: str | Path | None = None, checkpoint: str | None = None,
                   device: str = "auto") -> Embedder:
    """The embedder for pictures searched in ``index``: ``model`` (a run folder or .onnx), else the one the
    index was built from; refused (:class:`SearchIndexError`) if its embeddings do not fit the index."""
    source = index.metadata.get("run") or {}
    if model is None:
        if not source.get("path"):
            raise SearchIndexError("the index does not name the model it was built from: pass --model RUN_OR_ONNX")
        model, checkpoint = source["path"], checkpoint or source.get("checkpoint", "best")
    embedder = load_embedder(model, checkpoint or "best", device)
    index.check_compatible(embedder)
    return embedder


def load_queries(index: SearchIndex, images: Sequence[str | Path] = (), embeddings: str | Path | None = None,
                 ids: Sequence[str] = (), embedder: Embedder | None = None) -> tuple[list[str], np.ndarray]:
    """``(names, vectors [n, D])`` of the queries: picture files, every row of an embeddings file, stored ids
    (exactly one kind). Pictures need ``embedder`` (see :func:`index_embedder`)."""
    given = [bool(images), embeddings is not None, bool(ids)]
    if sum(given) != 1:
        raise InputError("give exactly one kind of query: --image PATH, --embedding FILE or --id ID")
    if images:
        if embedder is None:
            raise InputError("searching by image needs the model that embeds it")
        missing = [str(p) for p in images if not Path(p).is_file()]
        if missing:
            raise InputError(f"image file(s) not found: {', '.join(missing)}")
        return [str(p) for p in images], embedder.embed_images([load_rgb(p) for p in images])
    if embeddings is not None:
        file = Embeddings.load(embeddings)
        return [f"{Path(embeddings).name}:{i}" for i in file.ids], file.vectors
    return [str(i) for i in ids], np.stack([index.vector(i) for i in ids])
