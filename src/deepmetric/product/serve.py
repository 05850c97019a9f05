"""``deepmetric serve``: a FastAPI app over a search index — a JSON API and a small web page.

``POST /search`` takes a multipart upload (``file``, optional ``k``) or a gallery item's ``id`` (JSON or form)
and answers the top-k gallery items with distances, labels and, when the index is calibrated, match marks.
Bad uploads get a 4xx JSON ``{"detail": ...}`` that says what was wrong; the server keeps serving.
Decoding runs in the thread pool; embedding and search run there under one lock, so concurrent requests
never stack model forwards (each already has torch's threads) on the cores. Serving without the lock gave
the same throughput on 2 shared cores (``benchmarks/bench_serve.py --lock on off``).
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from deepmetric.errors import ConfigError, DataError, InputError, SearchIndexError
from deepmetric.product.embedder import Embedder, load_embedder
from deepmetric.product.index import SearchIndex

STATIC = Path(__file__).parent / "static"
K_MAX = 100
# 8-bit greyscale, palette, RGB(A), CMYK and YCbCr convert to the model's input without a guess; 16/32-bit
# integer and float images ("I", "I;16", "F") have no agreed scale to 8 bits and are refused.
MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")
ENVELOPE = 64 * 1024  # multipart boundaries, part headers and the small fields around the file


def create_app(index_dir: str | Path, model: str | Path | None = None, max_upload_bytes: int = 4 * 2**20,
               k_default: int = 8, max_pixels: int = 4096 * 4096, device: str = "auto") -> FastAPI:
    """The app serving ``index_dir`` with ``model`` (a run folder or an exported ``.onnx``; default: the run
    recorded in the index). Raises the index's or embedder's error at start-up if they do not fit together."""
    index = SearchIndex.load(index_dir)
    if model is None:
        model = (index.metadata.get("run") or {}).get("path")
        if model is None:
            raise SearchIndexError(f"the index in {index_dir} records no model: pass one with --model RUN|FILE.onnx")
    embedder = load_embedder(model, device=device)
    index.check_compatible(embedder)
    service = _Service(index, embedder, max_upload_bytes, max_pixels)
    if not 1 <= k_default <= service.k_max:
        raise ConfigError(f"--k must be between 1 and {service.k_max} for this index of {len(index)} items, "
                          f"got {k_default}")
    app = FastAPI(title="deepmetric search", summary=f"Top-k search over {len(index)} embedded gallery items.")
    app.state.service = service

    @app.get("/health")
    def health() -> dict:
        """Status, gallery size, embedding size and where the model came from."""
        return {"status": "ok", "count": len(index), "embedding_size": embedder.embedding_size,
                "distance": index.metadata["distance"], "threshold": index.metadata.get("threshold"),
                "model": embedder.source, "k_default": k_default, "k_max": service.k_max,
                "max_upload_bytes": max_upload_bytes}

    @app.get("/items")
    def items(limit: int = 10) -> list[dict]:
        """Up to ``limit`` gallery items to pick a query from, taking each label in turn."""
        if not 1 <= limit <= K_MAX:
            raise HTTPException(422, f"limit must be between 1 and {K_MAX}, got {limit}")
        return service.sample(limit)

    @app.get("/items/{item_id:path}/image")
    def item_image(item_id: str) -> Response:
        """A gallery item as a PNG."""
        buffer = io.BytesIO()
        service.image(item_id).save(buffer, format="PNG")
        return Response(buffer.getvalue(), media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.post("/search")
    async def search(request: Request) -> dict:
        """Top-k hits for an uploaded image (multipart ``file``) or a gallery item (``id``, itself left out)."""
        fields = await service.read_fields(request)
        k = _parse_k(fields.get("k", k_default), service.k_max)
        item_id, upload = fields.get("id"), fields.get("file")
        if (item_id is None) == (upload is None):
            raise HTTPException(422, "send exactly one query: an image as multipart field 'file', or a gallery "
                                     "item's 'id'")
        if upload is not None:
            if not isinstance(upload, UploadFile):
                raise HTTPException(422, "'file' must be an uploaded file (multipart/form-data), not a text field")
            data = await upload.read()
            hits = await run_in_threadpool(service.search_upload, data, k)
            return {"query": {"upload": upload.filename}, "k": k, "hits": hits}
        hits = await run_in_threadpool(service.search_id, str(item_id), k)
        return {"query": {"id": str(item_id)}, "k": k, "hits": hits}

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


class _Service:
    """The index and the embedder behind the endpoints, with the request checks that need them."""

    def __init__(self, index: SearchIndex, embedder: Embedder, max_upload_bytes: int, max_pixels: int):
        self.index, self.embedder = index, embedder
        self.max_upload_bytes, self.max_pixels = max_upload_bytes, max_pixels
        self.k_max = min(K_MAX, max(1, len(index) - 1))  # a search by id leaves the item itself out
        self.lock = threading.Lock()

    async def read_fields(self, request: Request) -> dict:
        """The request's fields (JSON object, multipart or url-encoded form), its body read up to the limit."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind not in ("application/json", "multipart/form-data", "application/x-www-form-urlencoded"):
            raise HTTPException(415, f"send multipart/form-data (field 'file') or JSON (field 'id'), not "
                                     f"'{kind or 'no content type'}'")
        limit = self.max_upload_bytes + ENVELOPE
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise self.too_large(int(declared))
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise self.too_large(len(body))
        if kind == "application/json":
            try:
                fields = json.loads(body or b"{}")
            except ValueError as exc:
                raise HTTPException(400, f"the JSON body does not parse: {exc}") from None
            if not isinstance(fields, dict):
                raise HTTPException(422, 'the JSON body must be an object like {"id": "...", "k": 8}')
            return fields

        async def replay() -> dict:
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        form = await Request(request.scope, replay).form(max_files=1, max_fields=4)
        return dict(form.items())

    def too_large(self, size: int) -> HTTPException:
        return HTTPException(413, f"the upload is {size:,} bytes; this server takes images up to "
                                  f"{self.max_upload_bytes:,} bytes (serve --max-upload-mb)")

    def decode(self, data: bytes) -> Image.Image:
        """The uploaded bytes as a loaded PIL image, or a 4xx saying why not."""
        if not data:
            raise HTTPException(422, "the uploaded file is empty")
        if len(data) > self.max_upload_bytes:
            raise self.too_large(len(data))
        try:
            image = Image.open(io.BytesIO(data))
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError):
            raise HTTPException(415, "the upload is not an image this server can read (PNG, JPEG, GIF, BMP, "
                                     "TIFF, WebP)") from None
        if image.width * image.height > self.max_pixels:
            raise HTTPException(413, f"the image is {image.width}x{image.height} pixels; this server takes up to "
                                     f"{self.max_pixels:,} pixels")
        if image.mode not in MODES:
            raise HTTPException(422, f"image mode '{image.mode}' is not supported: send an 8-bit greyscale, "
                                     f"palette, RGB(A) or CMYK image")
        try:
            image.load()
        except (OSError, ValueError, SyntaxError):
            raise HTTPException(415, "the image is truncated or corrupt and does not decode") from None
        return image

    def search_upload(self, data: bytes, k: int) -> list[dict]:
        image = self.decode(data)
        with self.lock:
            query = self.embedder.embed_images([image])
            hits = self.index.search(query, k)[0]
        return [asdict(h) for h in hits]

    def search_id(self, item_id: str, k: int) -> list[dict]:
        self.vector(item_id)  # 404 for an unknown id
        with self.lock:
            return [asdict(h) for h in self.index.search_ids([item_id], k)[0]]

    def vector(self, item_id: str) -> np.ndarray:
        try:
            return self.index.vector(item_id)
        except InputError as exc:  # an unknown id
            raise HTTPException(404, f"{exc}; GET /items lists some") from None

    def image(self, item_id: str) -> Image.Image:
        try:
            return self.index.image(item_id)
        except InputError as exc:
            raise HTTPException(404, f"{exc}; GET /items lists some") from None
        except DataError as exc:  # an item without a picture
            raise HTTPException(404, str(exc)) from None

    def sample(self, limit: int) -> list[dict]:
        """The first item of each label, then the second of each, ... (the first ``limit`` items if unlabelled)."""
        ids, labels, paths = self.index.ids, self.index.labels, self.index.paths
        if labels is None:
            order = np.arange(min(limit, len(ids)))
        else:
            labels = np.asarray(labels)
            by_label = np.argsort(labels, kind="stable")
            sorted_labels = labels[by_label]
            starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
            rank_in_label = np.empty_like(by_label)
            rank_in_label[by_label] = np.arange(len(labels)) - starts
            order = np.lexsort((labels, rank_in_label))[:limit]
        return [{"id": str(ids[i]), "label": None if labels is None else int(labels[i]),
                 "path": None if paths is None else paths[i]} for i in order]


def _parse_k(value: object, k_max: int) -> int:
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit())):
        raise HTTPException(422, f"k must be a whole number between 1 and {k_max}, got {value!r}")
    k = int(value)
    if not 1 <= k <= k_max:
        raise HTTPException(422, f"k must be between 1 and {k_max}, got {k}")
    return k


@contextmanager
def background(app: FastAPI, host: str = "127.0.0.1") -> Iterator[str]:
    """Run ``app`` with uvicorn in a daemon thread on a free port of ``host``; yield its base URL; stop on exit."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, 0))  # bound before the thread starts: no race for the port
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server thread stopped before it started serving")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
