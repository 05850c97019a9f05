"""SearchIndex: exact search equals brute force, approximate kinds report a true recall, persistence and errors."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from deepmetric.errors import DataError, InputError, SearchIndexError
from deepmetric.product import SearchIndex, index as index_module

RNG = np.random.default_rng(0)
X = RNG.standard_normal((3000, 16)).astype(np.float32)
IDS = [f"item{i}" for i in range(len(X))]
LABELS = np.arange(len(X)) % 7


def brute_force(queries, gallery, distance, k):
    if distance == "cosine":
        q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
        d = 1 - q.astype(np.float64) @ g.T.astype(np.float64)
    else:
        d = np.sqrt(((queries[:, None, :].astype(np.float64) - gallery[None]) ** 2).sum(-1))
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, 1), order


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_flat_search_equals_brute_force(distance):
    gallery, queries = X[:500], X[2000:2020]
    index = SearchIndex.build(gallery, IDS[:500], LABELS[:500], metadata={"distance": distance}, kind="flat")
    hits = index.search(queries, 7)
    want_d, want_rows = brute_force(queries, gallery, distance, 7)
    assert [[h.id for h in hs] for hs in hits] == [[IDS[r] for r in rows] for rows in want_rows]
    np.testing.assert_allclose([[h.distance for h in hs] for hs in hits], want_d, atol=1e-5)
    assert [h.rank for h in hits[0]] == list(range(1, 8))
    assert hits[0][0].label == LABELS[want_rows[0][0]] and hits[0][0].match is None
    assert index.metadata["recall"] is None and index.metadata["kind"] == "flat"


def test_search_by_id_leaves_the_item_out_and_keeps_its_twins():
    gallery = np.concatenate([X[:5], X[:1]])  # item5 is an exact copy of item0
    index = SearchIndex.build(gallery, IDS[:6], kind="flat", metadata={"distance": "euclidean"})
    own = index.search_ids(["item0", "item3"], 2)
    by_vector = index.search(gallery[[0, 3]], 3)
    assert [[h.id for h in hs] for hs in own] == [[h.id for h in hs if h.id != i][:2] for i, hs in
                                                 zip(["item0", "item3"], by_vector)]
    assert own[0][0].id == "item5" and own[0][0].distance == 0 and [h.rank for h in own[1]] == [1, 2]
    others = [r for r in range(6) if r != 2]  # every other item, by distance, twins in row order
    want = sorted(others, key=lambda r: (np.linalg.norm(gallery[r] - gallery[2]), r))
    assert [h.id for h in index.search_ids(["item2"], 10)[0]] == [IDS[r] for r in want]
    with pytest.raises(InputError, match="k must be a positive integer"):
        index.search_ids(["item0"], 0)
    with pytest.raises(InputError, match="no item 'nope'"):
        index.search_ids(["nope"], 1)


def test_a_single_query_vector_and_k_above_the_size():
    index = SearchIndex.build(X[:4], IDS[:4], kind="flat")
    hits = index.search(X[0], 10)
    assert len(hits) == 1 and [h.id for h in hits[0]][0] == "item0" and len(hits[0]) == 4
    assert hits[0][0].distance == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("kind,floor", [("hnsw", 0.95), ("ivfpq", 0.3)])
def test_approximate_kinds_report_their_recall_against_exact_search(kind, floor, tmp_path):
    index = SearchIndex.build(X, IDS, LABELS, kind=kind)
    meta = index.metadata
    assert meta["kind"] == kind and meta["recall_k"] == index_module.RECALL_K
    assert floor <= meta["recall"] <= 1
    # measured independently: every item as a query, through search(), itself left out
    k = meta["recall_k"]
    found = [[h.id for h in hs if h.id != IDS[q]][:k] for q, hs in enumerate(index.search(X, k + 1))]
    _, truth = brute_force(X, X, "cosine", k + 1)
    exact = [[IDS[r] for r in rows if r != q][:k] for q, rows in enumerate(truth)]
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(found, exact)])
    assert abs(recall - meta["recall"]) < 0.05
    # distances are exact whatever the kind
    d = np.array([[h.distance for h in hs] for hs in index.search(X[:5], 3)])
    rows = [[IDS.index(h.id) for h in hs] for hs in index.search(X[:5], 3)]
    want = 1 - np.einsum("qd,qkd->qk", X[:5] / np.linalg.norm(X[:5], axis=1, keepdims=True),
                         (X / np.linalg.norm(X, axis=1, keepdims=True))[np.array(rows)])
    np.testing.assert_allclose(d, np.maximum(want, 0), atol=1e-5)
    back = SearchIndex.load(index.save(tmp_path / "idx"))
    assert [[h.id for h in hs] for hs in back.search(X[:20], 5)] == [[h.id for h in hs] for hs in index.search(X[:20], 5)]
    assert back.metadata == json.loads(json.dumps(meta))


def test_auto_picks_by_size(monkeypatch):
    assert SearchIndex.build(X[:300], IDS[:300]).metadata["kind"] == "flat"
    monkeypatch.setattr(index_module, "HNSW_FROM", 100)
    assert SearchIndex.build(X[:300], IDS[:300]).metadata["kind"] == "hnsw"
    assert index_module.choose_kind(10**7) == "ivfpq"


def test_save_load_keeps_items_and_metadata(tmp_path):
    paths = [f"/img/{i}.png" for i in range(50)]
    index = SearchIndex.build(X[:50], IDS[:50], LABELS[:50], paths, {"distance": "euclidean", "run": {"path": "r"}})
    back = SearchIndex.load(index.save(tmp_path / "idx"))
    assert len(back) == 50 and back.ids == IDS[:50] and back.paths == paths
    np.testing.assert_array_equal(back.labels, LABELS[:50])
    np.testing.assert_array_equal(back.vector("item7"), X[7])
    assert back.metadata["distance"] == "euclidean" and back.metadata["run"] == {"path": "r"}
    assert back.metadata["normalize"] is False and back.metadata["threshold"] is None


def test_normalisation_is_recorded_or_inferred():
    unit = X[:10] / np.linalg.norm(X[:10], axis=1, keepdims=True)
    assert SearchIndex.build(unit, IDS[:10]).metadata["normalize"] is True
    assert SearchIndex.build(X[:10], IDS[:10], metadata={"normalize": True}).metadata["normalize"] is True


def test_threshold_marks_matches():
    index = SearchIndex.build(np.array([[0.0], [1.0], [3.0]]), ["a", "b", "c"], metadata={"distance": "euclidean"})
    hits = index.search(np.array([[0.0]]), 3, threshold=1.5)[0]
    assert [(h.id, h.distance, h.match) for h in hits] == [("a", 0.0, True), ("b", 1.0, True), ("c", 3.0, False)]
    index.metadata["threshold"] = 0.5
    assert [h.match for h in index.search(np.array([[0.0]]), 3)[0]] == [True, False, False]


@pytest.mark.parametrize("k", [0, -1, 2.5, True, "3"])
def test_bad_k(k):
    with pytest.raises(InputError, match="k must be a positive integer"):
        SearchIndex.build(X[:5], IDS[:5]).search(X[:1], k)


def test_bad_queries_and_ids():
    index = SearchIndex.build(X[:5], IDS[:5])
    with pytest.raises(SearchIndexError, match="16-dimensional"):
        index.search(np.zeros((1, 8)), 1)
    with pytest.raises(InputError, match="NaN"):
        index.search(np.full((1, 16), np.nan), 1)
    with pytest.raises(InputError, match="no item 'item9'.*Did you mean"):
        index.vector("item9")
    with pytest.raises(SearchIndexError, match="unknown index kind 'hnws'.*Did you mean 'hnsw'"):
        SearchIndex.build(X[:5], IDS[:5], kind="hnws")
    with pytest.raises(SearchIndexError, match="embedding_size 8"):
        SearchIndex.build(X[:5], IDS[:5], metadata={"embedding_size": 8})


def test_incompatible_models_are_refused():
    index = SearchIndex.build(X[:5] / np.linalg.norm(X[:5], axis=1, keepdims=True), IDS[:5])
    good = SimpleNamespace(embedding_size=16, distance="cosine", normalize=True)
    index.check_compatible(good)
    for change, word in [({"embedding_size": 32}, "embedding_size 16"), ({"distance": "euclidean"}, "distance"),
                         ({"normalize": False}, "normalize True")]:
        with pytest.raises(SearchIndexError, match=word):
            index.check_compatible(SimpleNamespace(**{**vars(good), **change}))


def test_malformed_index_folders(tmp_path):
    with pytest.raises(SearchIndexError, match="no index folder"):
        SearchIndex.load(tmp_path / "nothing")
    d = SearchIndex.build(X[:20], IDS[:20]).save(tmp_path / "idx")
    (d / "items.npz").rename(d / "moved.npz")
    with pytest.raises(SearchIndexError, match="missing items.npz"):
        SearchIndex.load(d)
    (d / "moved.npz").rename(d / "items.npz")
    meta = json.loads((d / "metadata.json").read_text())
    (d / "metadata.json").write_text("{not json")
    with pytest.raises(SearchIndexError, match="not valid JSON"):
        SearchIndex.load(d)
    (d / "metadata.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "distance"}))
    with pytest.raises(SearchIndexError, match="lacks distance"):
        SearchIndex.load(d)
    (d / "metadata.json").write_text(json.dumps({**meta, "count": 21}))
    with pytest.raises(SearchIndexError, match="inconsistent"):
        SearchIndex.load(d)
    (d / "metadata.json").write_text(json.dumps(meta))
    (d / "index.faiss").write_bytes(b"garbage")
    with pytest.raises(SearchIndexError, match="cannot read"):
        SearchIndex.load(d)


def test_image_of_an_item_with_a_file(tmp_path):
    Image.new("RGB", (5, 4), (10, 20, 30)).save(tmp_path / "a.png")
    index = SearchIndex.build(X[:1], ["a"], paths=[str(tmp_path / "a.png")])
    img = index.image("a")
    assert img.size == (5, 4) and img.getpixel((0, 0)) == (10, 20, 30)
    with pytest.raises(DataError, match="no image file"):
        SearchIndex.build(X[:1], ["a"]).image("a")


def test_rescoring_in_chunks_gives_the_same_hits(monkeypatch):
    index = SearchIndex.build(X[:300], IDS[:300], metadata={"distance": "euclidean"}, kind="flat")
    whole = index.search(X[:50], 4)
    monkeypatch.setattr(index_module, "RESCORE_BUDGET", 4 * 4 * 16 * 3)  # 3 queries per chunk
    assert index.search(X[:50], 4) == whole
