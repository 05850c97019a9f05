"""From a trained run to a product: embed a data set, index it with faiss, search, calibrate a match
threshold, export the model to ONNX.

* :mod:`~deepmetric.product.embedder`: :class:`Embedder` of a run folder or an exported ``.onnx``.
* :mod:`~deepmetric.product.store`: embeddings files (``.npz``, ``.parquet``, ``.npy``) with ids, labels, paths.
* :mod:`~deepmetric.product.index`: :class:`SearchIndex` (flat, HNSW, IVF-PQ), persisted with its metadata.
* :mod:`~deepmetric.product.inputs`: how pictures become a model's inputs (a JSON spec that travels along).
* :mod:`~deepmetric.product.queries`: query vectors from pictures, an embeddings file or stored ids.
* :mod:`~deepmetric.product.calibrate`: the match threshold for a target precision or FAR.
* :mod:`~deepmetric.product.export`: ONNX export with an onnxruntime parity check.
* :mod:`~deepmetric.product.serve`: the web page and JSON API (``deepmetric serve``).
"""

from deepmetric.product.embedder import Embedder, embed_data, load_embedder
from deepmetric.product.index import Hit, SearchIndex
from deepmetric.product.store import Embeddings

__all__ = ["Embedder", "embed_data", "load_embedder", "Hit", "SearchIndex", "Embeddings"]
