"""Evaluation of embeddings: exact kNN retrieval metrics, clustering metrics and verification.

``evaluate(embeddings, labels, ...) -> dict[str, float]`` is the entry point used by the trainer and
the CLI (which uses ``evaluate_files``, ``format_table`` and ``write_json``); the modules hold the
pieces: :mod:`.knn` (exact chunked top-k, torch or faiss), :mod:`.retrieval`, :mod:`.clustering`,
:mod:`.verification` and :mod:`.io`.
"""

from deepmetric.evaluation.api import METRICS, evaluate
from deepmetric.evaluation.io import evaluate_files, format_table, load_array, write_json
from deepmetric.evaluation.knn import Neighbors, knn
from deepmetric.evaluation.verification import verification_metrics

__all__ = [
    "METRICS",
    "Neighbors",
    "evaluate",
    "evaluate_files",
    "format_table",
    "knn",
    "load_array",
    "verification_metrics",
    "write_json",
]
