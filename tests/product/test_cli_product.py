"""The product commands as a user runs them: embed -> index -> search / calibrate / match -> export."""

import json

import pytest
from typer.testing import CliRunner

from deepmetric.cli import app
from deepmetric.product import SearchIndex

runner = CliRunner()


def run(*args, code=0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result.output


@pytest.fixture(scope="module")
def gallery(run_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    assert "wrote 896 embeddings of size 16 (digits, split test)" in run("embed", run_dir, "--out", d / "g.parquet",
                                                                        "--no-progress")
    assert "indexed 896 items (flat" in run("index", d / "g.parquet", "--out", d / "idx")
    return d


def test_search_by_id_image_and_embeddings_file(gallery, run_dir):
    hits = json.loads(run("search", gallery / "idx", "--id", "test/3", "-k", "3", "--json"))
    assert hits[0]["query"] == "test/3" and [h["rank"] for h in hits[0]["hits"]] == [1, 2, 3]
    assert "test/3" not in [h["id"] for h in hits[0]["hits"]] and hits[0]["hits"][0]["match"] is None
    index = SearchIndex.load(gallery / "idx")
    by_vector = index.search(index.vector("test/3"), 4)[0]  # the item itself first, at distance 0
    assert by_vector[0].id == "test/3" and [h["id"] for h in hits[0]["hits"]] == [h.id for h in by_vector[1:]]
    SearchIndex.load(gallery / "idx").image("test/9").save(gallery / "nine.png")
    table = run("search", gallery / "idx", "--image", gallery / "nine.png", "-k", "2")
    assert "nearest to" in table and "test/9" in table and "distance" in table
    run("embed", run_dir, "--split", "train", "--out", gallery / "q.npz", "--no-progress")
    many = json.loads(run("search", gallery / "idx", "--embedding", gallery / "q.npz", "-k", "1", "--json"))
    assert len(many) == 901 and many[0]["query"] == "q.npz:train/0"


def test_calibrate_then_match(gallery):
    run("index", gallery / "g.parquet", "--out", gallery / "cal", "--kind", "flat")
    out = run("calibrate", gallery / "cal", "--embeddings", gallery / "g.parquet", "--precision", "0.5")
    assert "threshold" in out and "stored in" in out
    meta = json.loads((gallery / "cal" / "metadata.json").read_text())
    t = meta["threshold"]
    assert meta["calibration"]["target"] == {"precision": 0.5} and meta["calibration"]["precision"] >= 0.5
    matched = json.loads(run("match", gallery / "cal", "--id", "test/3", "--json"))[0]["hits"]
    assert matched and all(h["match"] and h["distance"] <= t for h in matched)
    marked = json.loads(run("search", gallery / "cal", "--id", "test/3", "-k", "50", "--json"))[0]["hits"]
    assert [h["id"] for h in marked if h["match"]] == [h["id"] for h in matched if h["rank"] <= 50]
    none = json.loads(run("search", gallery / "cal", "--id", "test/3", "--threshold", "-1", "--json"))[0]["hits"]
    assert not any(h["match"] for h in none)


def test_clear_errors(gallery, tmp_path, run_dir):
    assert "must end in one of" in run("embed", run_dir, "--out", tmp_path / "e.csv", code=2)
    assert "k must be a positive integer" in run("search", gallery / "idx", "--id", "test/3", "-k", "0", code=2)
    assert "no index folder" in run("search", tmp_path / "nope", "--id", "x", code=2)
    assert "exactly one kind of query" in run("search", gallery / "idx", code=2)
    assert "no stored threshold" in run("match", gallery / "idx", "--id", "test/3", code=2)
    assert "already holds an index" in run("index", gallery / "g.parquet", "--out", gallery / "idx", code=2)
    assert "image file(s) not found" in run("search", gallery / "idx", "--image", tmp_path / "x.png", code=2)
    assert "neither a run folder" in run("embed", tmp_path / "nope", "--out", tmp_path / "e.npz", code=2)


def test_help_explains_the_commands():
    for command, words in [("embed", ["--data", "--split", ".parquet"]), ("index", ["--kind", "HNSW"]),
                           ("search", ["--image", "--embedding", "--threshold", "--json"]),
                           ("calibrate", ["--precision", "--far"]), ("match", ["--limit"]), ("export", ["--format"])]:
        text = run(command, "--help")
        assert all(w in text for w in words), (command, text)


@pytest.mark.slow
def test_export_then_embed_and_search_with_the_onnx_model(gallery, run_dir):
    out = run("export", run_dir, "--format", "onnx", "--out", gallery / "m.onnx")
    assert "max abs diff" in out
    run("embed", gallery / "m.onnx", "--out", gallery / "o.npz", "--no-progress")
    run("index", gallery / "o.npz", "--out", gallery / "oidx")
    SearchIndex.load(gallery / "oidx").image("test/9").save(gallery / "onnx-nine.png")
    table = run("search", gallery / "oidx", "--image", gallery / "onnx-nine.png", "-k", "1")
    assert "test/9" in table
