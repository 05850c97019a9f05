"""Evaluation of embeddings: exact kNN retrieval metrics, clustering metrics and verification.

``evaluate(embeddings, labels, ...) -> dict[str, float]`` is the entry point used by the trainer and
the CLI; the modules hold the pieces: :mod:`.knn` (exact chunked top-k, torch or faiss),
:mod:`.retrieval`, :mod:`.clustering`, :mod:`.verification` and :mod:`.io` (files and tables).
"""

from deepmetric.evaluation.api import METRICS, evaluate
from deepmetric.evaluation.knn import Neighbors, knn

__all__ = ["METRICS", "Neighbors", "evaluate", "knn"]
