"""The serve web page in a real headless browser: Debian's chromium driven by playwright against uvicorn on
127.0.0.1. Upload a query, see k cards with distances, labels and match marks; pick a gallery item as the
query; a bad upload shows the server's error and the next upload works. Writes a screenshot (to
``docs/serve.png`` too when ``DEEPMETRIC_WRITE_DOCS=1``: the README's picture). Fails instead of skipping
when chromium is missing under CI (``make test`` installs it)."""

from __future__ import annotations

import io
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest
from PIL import Image

from deepmetric.product import SearchIndex, embed_data, load_embedder
from deepmetric.product.calibrate import calibrate
from deepmetric.product.serve import background, create_app
from deepmetric.training import Trainer, load

pytestmark = pytest.mark.slow
CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DOCS = Path(__file__).resolve().parents[2] / "docs" / "serve.png"


@pytest.fixture(scope="module")
def calibrated_index(tmp_path_factory):
    """A digits run trained long enough for its neighbours to look right (10 epochs, ~10 s), its test split
    indexed, the match threshold calibrated for precision 0.7 on the same split."""
    root = tmp_path_factory.mktemp("browser")
    Trainer(load(None, ["train.epochs=10", "eval.tsne=false", "eval.ks=[1]"]), root / "run", progress=False).fit()
    embeddings = embed_data(load_embedder(root / "run", device="cpu"))
    index = SearchIndex.from_embeddings(embeddings)
    calibrate(index, embeddings, precision=0.7)
    return index.save(root / "index")


@pytest.fixture(scope="module")
def url(calibrated_index):
    with background(create_app(calibrated_index, device="cpu")) as base:
        yield base


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory):
    if not CHROMIUM.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing under CI: `make test` installs it (apt-get install chromium)")
        pytest.skip(f"Debian's chromium is not installed ({CHROMIUM}): sudo apt-get install chromium fonts-dejavu-core")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=str(CHROMIUM), headless=True,
            args=FLAGS, viewport={"width": 1100, "height": 700})
        yield context
        context.close()


@pytest.fixture
def page(browser_context, url):
    from playwright.sync_api import expect

    expect.set_options(timeout=20_000)  # a loaded CI machine: wait longer than playwright's 5 s
    page = browser_context.new_page()
    page.set_default_timeout(20_000)
    page.goto(url)
    yield page
    page.close()


def png_of(index: SearchIndex, item: str) -> bytes:
    buffer = io.BytesIO()
    index.image(item).save(buffer, format="PNG")
    return buffer.getvalue()


def upload(page, name: str, data: bytes, kind: str = "image/png") -> None:
    page.set_input_files("#file", files=[{"name": name, "mimeType": kind, "buffer": data}])


def cards(page) -> list[dict]:
    """The result cards, once every picture on the page has loaded."""
    page.wait_for_function("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
    return page.eval_on_selector_all("#hits li", """cards => cards.map(c => ({
        id: c.dataset.id, cls: c.className, text: c.innerText, picture: c.querySelector('img').naturalWidth}))""")


def test_upload_shows_k_cards_with_distances_labels_and_match_marks(page, url, calibrated_index, tmp_path):
    from playwright.sync_api import expect

    index = SearchIndex.load(calibrated_index)
    item = index.ids[index.labels.tolist().index(7)]  # the gallery's first 7
    expect(page.locator("#status")).to_contain_text("896 gallery items")
    expect(page.locator("#picks button")).to_have_count(10)
    page.fill("#k", "10")
    upload(page, "seven.png", png_of(index, item))
    expect(page.locator("#hits li")).to_have_count(10)
    expect(page.locator("#query-caption")).to_have_text("upload: seven.png")
    api = httpx.post(f"{url}/search", files={"file": ("q.png", png_of(index, item), "image/png")},
                     data={"k": "10"}).json()["hits"]
    shown = cards(page)
    assert [c["id"] for c in shown] == [h["id"] for h in api] and shown[0]["id"] == item
    for card, hit in zip(shown, api):
        assert f"#{hit['rank']}" in card["text"] and f"label {hit['label']}" in card["text"]
        assert f"cosine {hit['distance']:.4f}" in card["text"]
        assert ("✓ match" if hit["match"] else "✗ no match") in card["text"] and card["picture"] == 128
        assert card["cls"] == f"hit {'match' if hit['match'] else 'no-match'}"
    assert {h["match"] for h in api} == {True, False}  # the page shows both marks
    expect(page.locator("#error")).to_be_hidden()
    shot = page.screenshot(path=str(tmp_path / "serve.png"), full_page=True)
    assert Image.open(io.BytesIO(shot)).size[0] == 1100
    if os.environ.get("DEEPMETRIC_WRITE_DOCS") == "1":
        DOCS.parent.mkdir(exist_ok=True)
        shutil.copyfile(tmp_path / "serve.png", DOCS)


def test_clicking_a_gallery_item_makes_it_the_query(page, url):
    from playwright.sync_api import expect

    expect(page.locator("#picks button")).to_have_count(10)
    pick = page.locator("#picks button").nth(3)
    item = pick.get_attribute("data-id")
    pick.click()
    expect(page.locator("#query-caption")).to_have_text(re.compile(rf"^gallery item {re.escape(item)}, label \d$"))
    expect(page.locator("#hits li")).to_have_count(8)  # the server's default k
    api = httpx.post(f"{url}/search", json={"id": item, "k": 8}).json()["hits"]
    assert [c["id"] for c in cards(page)] == [h["id"] for h in api] and item not in [h["id"] for h in api]
    expect(pick).to_have_class("chosen")


def test_a_bad_upload_shows_the_error_and_the_next_upload_works(page, calibrated_index):
    from playwright.sync_api import expect

    expect(page.locator("#picks button")).to_have_count(10)
    upload(page, "notes.txt", b"not a picture", kind="text/plain")
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text("415: the upload is not an image")
    expect(page.locator("#hits li")).to_have_count(0)
    expect(page.locator("#query-image")).to_be_hidden()  # no broken picture for a non-image
    expect(page.locator("#results-title")).to_have_text("Results")
    page.fill("#k", "0")
    upload(page, "five.png", png_of(SearchIndex.load(calibrated_index), "test/0"))
    expect(page.locator("#error")).to_contain_text("422: k must be between 1 and 100")
    page.fill("#k", "3")
    upload(page, "five-again.png", png_of(SearchIndex.load(calibrated_index), "test/0"))
    expect(page.locator("#hits li")).to_have_count(3)
    expect(page.locator("#error")).to_be_hidden()
