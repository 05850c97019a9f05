"""The serve JSON API against a real tiny digits run and its index: answers equal the library's, every bad
request gets a clear 4xx and the next good request still works."""

from __future__ import annotations

import asyncio
import io
import json
import shutil

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from deepmetric.cli import app as cli
from deepmetric.errors import ConfigError, SearchIndexError
from deepmetric.product import SearchIndex, load_embedder
from deepmetric.product.serve import create_app


@pytest.fixture(scope="module")
def index(index_dir):
    return SearchIndex.load(index_dir)


@pytest.fixture(scope="module")
def embedder(run_dir):
    return load_embedder(run_dir, device="cpu")


@pytest.fixture(scope="module")
def client(index_dir):
    return TestClient(create_app(index_dir, device="cpu"))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def upload(client, data: bytes, k=None, name="query.png", kind="image/png"):
    return client.post("/search", files={"file": (name, data, kind)}, data={} if k is None else {"k": str(k)})


def assert_serving(client, index):
    """A good request right after a bad one: the server is still answering correctly."""
    response = client.post("/search", json={"id": index.ids[0], "k": 3})
    assert response.status_code == 200 and len(response.json()["hits"]) == 3


def test_health(client, index, run_dir):
    body = client.get("/health").json()
    assert body["status"] == "ok" and body["count"] == len(index) == 896
    assert body["embedding_size"] == 16 and body["distance"] == "cosine" and body["threshold"] is None
    assert body["model"]["kind"] == "run" and body["model"]["path"] == str(run_dir.resolve())
    assert body["k_default"] == 8 and body["k_max"] == 100


@pytest.mark.parametrize("item", ["test/0", "test/17", "test/895"])
def test_search_by_upload_answers_what_the_library_answers(client, index, embedder, item):
    picture = index.image(item)
    body = upload(client, png(picture), k=5).json()
    expected = index.search(embedder.embed_images([picture]), 5)[0]
    assert body["query"] == {"upload": "query.png"} and body["k"] == 5
    assert body["hits"] == [h.to_dict() for h in expected]
    # the picture of a digit embeds back to its own vector: the item itself comes first, at distance 0
    assert body["hits"][0]["id"] == item and body["hits"][0]["distance"] == pytest.approx(0, abs=1e-6)


def test_upload_without_k_uses_the_default(client, index):
    assert len(upload(client, png(index.image("test/3"))).json()["hits"]) == 8


@pytest.mark.parametrize("send", ["json", "form", "multipart"])
def test_search_by_id_leaves_the_item_itself_out(client, index, send):
    item = "test/42"
    if send == "json":
        response = client.post("/search", json={"id": item, "k": 4})
    elif send == "form":
        response = client.post("/search", data={"id": item, "k": "4"})
    else:
        response = client.post("/search", files={"id": (None, item), "k": (None, "4")})
    body = response.json()
    full = [h.to_dict() for h in index.search(index.vector(item), 5)[0]]
    others = [h for h in full if h["id"] != item][:4]
    assert response.status_code == 200 and body["query"] == {"id": item}
    assert [h["id"] for h in body["hits"]] == [h["id"] for h in others]
    assert [h["distance"] for h in body["hits"]] == [h["distance"] for h in others]
    assert [h["rank"] for h in body["hits"]] == [1, 2, 3, 4]


def test_k_bounds(client, index):
    assert len(client.post("/search", json={"id": "test/1", "k": 1}).json()["hits"]) == 1
    assert len(client.post("/search", json={"id": "test/1", "k": 100}).json()["hits"]) == 100
    assert len(client.post("/search", json={"id": "test/1", "k": "7"}).json()["hits"]) == 7
    for bad in (0, -1, 101, 2.5, "abc", "2.5", True, None, [3]):
        response = client.post("/search", json={"id": "test/1", "k": bad})
        assert response.status_code == 422, bad
        assert "k must be" in response.json()["detail"]
        assert_serving(client, index)


def _image(mode: str, size=(8, 8), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format=fmt)
    return buffer.getvalue()


BAD_UPLOADS = {
    "not an image": (b"hello, I am text", 415, "not an image"),
    "empty file": (b"", 422, "empty"),
    "truncated png": ("truncated", 415, "truncated or corrupt"),
    "16-bit greyscale": (_image("I;16"), 422, "mode 'I;16'"),
    "32-bit float": (_image("F", fmt="TIFF"), 422, "mode 'F'"),
    "too many pixels": (_image("1", (5000, 4000)), 413, "5000x4000 pixels"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_uploads_get_a_clear_4xx_and_the_server_keeps_serving(client, index, case):
    data, status, message = BAD_UPLOADS[case]
    if data == "truncated":
        whole = png(index.image("test/5"))
        data = whole[: len(whole) // 2]
    response = upload(client, data)
    assert response.status_code == status and message in response.json()["detail"], response.text
    assert_serving(client, index)


def test_uploads_over_the_size_limit_get_413_declared_or_streamed(index_dir, index):
    small = TestClient(create_app(index_dir, device="cpu", max_upload_bytes=2000))
    picture = png(index.image("test/0"))
    assert len(picture) < 2000 and upload(small, picture).status_code == 200
    big = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # noise: PNG can't shrink it
    response = upload(small, png(Image.fromarray(big)))
    assert response.status_code == 413 and "up to 2,000 bytes" in response.json()["detail"]
    # a chunked body (no Content-Length) is counted while it streams
    chunks = (b"x" * 10_000 for _ in range(10))
    response = small.post("/search", content=chunks, headers={"content-type": "multipart/form-data; boundary=b"})
    assert response.status_code == 413 and "up to 2,000 bytes" in response.json()["detail"]
    assert_serving(small, index)


@pytest.mark.parametrize("request_kw, status, message", [
    ({"json": {"k": 3}}, 422, "exactly one query"),
    ({"files": {"file": ("q.png", b"x", "image/png")}, "data": {"id": "test/0"}}, 422, "exactly one query"),
    ({"json": {"id": "test/99999"}}, 404, "no item 'test/99999'"),
    ({"data": {"file": "not a file"}}, 422, "must be an uploaded file"),
    ({"content": b"id=test/0", "headers": {"content-type": "text/plain"}}, 415, "not 'text/plain'"),
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "does not parse"),
    ({"json": ["test/0"]}, 422, "must be an object"),
])
def test_bad_requests(client, index, request_kw, status, message):
    response = client.post("/search", **request_kw)
    assert response.status_code == status and message in response.json()["detail"], response.text
    assert_serving(client, index)


def test_items_take_each_label_in_turn(client, index):
    items = client.get("/items?limit=10").json()
    labels = index.labels.tolist()
    firsts = {label: index.ids[labels.index(label)] for label in range(5, 10)}
    seconds = {label: index.ids[labels.index(label, labels.index(label) + 1)] for label in range(5, 10)}
    assert [i["label"] for i in items[:5]] == [5, 6, 7, 8, 9] == [i["label"] for i in items[5:]]
    assert [i["id"] for i in items[:5]] == [firsts[label] for label in range(5, 10)]
    assert [i["id"] for i in items[5:]] == [seconds[label] for label in range(5, 10)]
    assert all(i["path"] is None for i in items)
    for bad in (0, 101):
        assert client.get(f"/items?limit={bad}").status_code == 422


def test_item_image_is_the_gallery_picture(client, index):
    response = client.get("/items/test/7/image")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    served = np.asarray(Image.open(io.BytesIO(response.content)))
    assert served.shape == (128, 128, 3) and np.array_equal(served, np.asarray(index.image("test/7")))
    missing = client.get("/items/test/99999/image")
    assert missing.status_code == 404 and "test/99999" in missing.json()["detail"]


def test_the_page_and_its_files(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="file"' in page.text and 'id="hits"' in page.text and "/static/app.js" in page.text
    assert "fetch(\"/search\"" in client.get("/static/app.js").text.replace("'", '"')
    assert client.get("/static/style.css").status_code == 200
    assert "http" not in page.text  # nothing from the network: no CDN


def test_a_stored_threshold_sets_the_match_marks(index_dir, tmp_path, index):
    threshold = float(np.median([h.distance for h in index.search(index.vector("test/0"), 51)[0]]))
    copy = shutil.copytree(index_dir, tmp_path / "index")
    meta = json.loads((copy / "metadata.json").read_text())
    (copy / "metadata.json").write_text(json.dumps({**meta, "threshold": threshold}))
    calibrated = TestClient(create_app(copy, device="cpu"))
    assert calibrated.get("/health").json()["threshold"] == threshold
    hits = calibrated.post("/search", json={"id": "test/0", "k": 50}).json()["hits"]
    assert [h["match"] for h in hits] == [h["distance"] <= threshold for h in hits]
    assert {h["match"] for h in hits} == {True, False}


def test_start_up_refuses_an_index_the_model_does_not_fit(index_dir, tmp_path):
    copy = shutil.copytree(index_dir, tmp_path / "index")
    meta = json.loads((copy / "metadata.json").read_text())
    (copy / "metadata.json").write_text(json.dumps({**meta, "distance": "euclidean"}))
    with pytest.raises(SearchIndexError, match="distance 'euclidean' \\(index\\) vs 'cosine' \\(model\\)"):
        create_app(copy, device="cpu")
    (copy / "metadata.json").write_text(json.dumps({**meta, "run": None}))
    with pytest.raises(SearchIndexError, match="records no model: pass one with --model"):
        create_app(copy, device="cpu")
    with pytest.raises(ConfigError, match="--k must be between 1 and 100"):
        create_app(index_dir, device="cpu", k_default=0)


def test_concurrent_searches_answer_as_sequential_ones(index_dir, index):
    app = create_app(index_dir, device="cpu")
    items = index.ids[:24]
    pictures = {item: png(index.image(item)) for item in items[:12]}
    sequential = TestClient(app)
    expected = [sequential.post("/search", json={"id": item, "k": 5}).json() for item in items[12:]]
    expected += [upload(sequential, pictures[item], k=5).json()["hits"] for item in items[:12]]

    async def run_all():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serve") as client:
            by_id = [client.post("/search", json={"id": item, "k": 5}) for item in items[12:]]
            by_upload = [client.post("/search", files={"file": ("q.png", pictures[item], "image/png")},
                                     data={"k": "5"}) for item in items[:12]]
            return await asyncio.gather(*by_id, *by_upload)

    responses = asyncio.run(run_all())
    assert all(r.status_code == 200 for r in responses)
    answers = [r.json() for r in responses[:12]] + [r.json()["hits"] for r in responses[12:]]
    assert answers == expected


def test_cli_serve_help_and_a_wrong_index_path(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["serve", "--help"])
    assert result.exit_code == 0 and "--model" in result.output and "--port" in result.output
    result = runner.invoke(cli, ["serve", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "no index folder at" in result.output


@pytest.mark.slow  # the ONNX export takes seconds
def test_serves_the_exported_onnx_model(index_dir, run_dir, tmp_path, index, client):
    from deepmetric.product.export import export_run

    onnx = export_run(run_dir, tmp_path / "model.onnx")["path"]
    served = TestClient(create_app(index_dir, model=onnx))
    assert served.get("/health").json()["model"]["kind"] == "onnx"
    for item in ("test/0", "test/500"):
        picture = png(index.image(item))
        by_onnx, by_torch = upload(served, picture, k=5).json()["hits"], upload(client, picture, k=5).json()["hits"]
        assert [h["id"] for h in by_onnx][:1] == [item] == [h["id"] for h in by_torch][:1]
        assert [h["distance"] for h in by_onnx] == pytest.approx([h["distance"] for h in by_torch], abs=1e-4)
