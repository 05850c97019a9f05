"""One tiny digits run shared by the product tests (trained once per test process)."""

from __future__ import annotations

import pytest

from deepmetric.training import Trainer, load

RUN_OVERRIDES = ["train.epochs=2", "eval.tsne=false", "train.iterations_per_epoch=4", "eval.ks=[1,2]",
                 "model.embedding_size=16"]


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    """A finished digits run folder (16-d cosine embeddings, 2 short epochs)."""
    out = tmp_path_factory.mktemp("product") / "run"
    Trainer(load(None, RUN_OVERRIDES), out, progress=False).fit()
    return out


@pytest.fixture(scope="session")
def index_dir(run_dir):
    """The run's test split (digits 5-9, 896 items) embedded and indexed (flat, cosine), no threshold."""
    from deepmetric.product import SearchIndex, embed_data, load_embedder

    out = run_dir.parent / "index"
    SearchIndex.from_embeddings(embed_data(load_embedder(run_dir, device="cpu"))).save(out)
    return out
