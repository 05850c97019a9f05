"""The report's Recall@K curve and worst-query gallery: hand-computed values and the files a run writes."""

import numpy as np
import pytest
import torch

from deepmetric.training import Trainer, load
from deepmetric.training.retrieval_figures import neighbours, recall_curve, worst_queries


def test_recall_curve_and_worst_queries_by_hand():
    rel = torch.tensor([[False, True, False], [True, False, False], [False, False, False]])
    np.testing.assert_allclose(recall_curve(rel), [1 / 3, 2 / 3, 2 / 3])
    order, scores = worst_queries(torch.zeros(3, 3), torch.zeros(3, 3, dtype=torch.long), rel, torch.tensor([1, 1, 1]),
                                  count=2)
    assert order.tolist() == [0, 2] and scores.tolist() == [0.0, 0.0]  # ties: lower index first


def test_neighbours_leave_the_query_out():
    x = torch.tensor([[0.0], [1.0], [0.4], [5.0]])
    dist, idx, rel, n_rel = neighbours(x, torch.tensor([0, 0, 1, 1]), "euclidean")
    assert idx[:, 0].tolist() == [2, 2, 0, 1] and n_rel.tolist() == [1, 1, 1, 1]
    assert rel[0].tolist() == [False, True, False]
    np.testing.assert_allclose(dist[0], [0.4, 1.0, 5.0], atol=1e-6)


@pytest.mark.slow
def test_a_run_report_shows_both_figures_without_tsne(tmp_path, fast_overrides):
    Trainer(load(None, fast_overrides), tmp_path / "run", progress=False).fit()
    report = tmp_path / "run" / "report"
    assert (report / "recall_at_k.png").is_file() and (report / "worst_queries.png").is_file()
    assert not (report / "tsne.png").exists()
    html = (report / "report.html").read_text()
    assert 'src="recall_at_k.png"' in html and 'src="worst_queries.png"' in html
    assert "<h2>Recall@K on the test classes</h2>" in html and "<h2>recall_at_k</h2>" not in html
