"""Embedder: a run folder embeds pictures exactly as its data set prepares items; embed_data's ids, labels, paths."""

import numpy as np
import pytest
from PIL import Image, ImageOps

from deepmetric.data.digits import Digits
from deepmetric.errors import ExportError, InputError, RunFolderError, UnknownNameError
from deepmetric.product import SearchIndex, embed_data, load_embedder
from deepmetric.product.inputs import pictures_to_inputs


@pytest.fixture(scope="module")
def embedder(run_dir):
    return load_embedder(run_dir)


@pytest.fixture(scope="module")
def test_file(embedder):
    return embed_data(embedder)


def test_the_embedder_describes_its_run(embedder, run_dir):
    assert (embedder.embedding_size, embedder.distance, embedder.normalize) == (16, "cosine", True)
    assert embedder.source == {"kind": "run", "path": str(run_dir.resolve()), "checkpoint": "best", "file": "last.pt"}
    assert embedder.input == {"kind": "dataset", "data": "digits"}
    assert embedder.config["model"]["embedding_size"] == 16


def test_embed_data_keeps_ids_labels_and_provenance(test_file):
    digits = Digits(split="test")
    assert test_file.vectors.shape == (len(digits), 16) and test_file.vectors.dtype == np.float32
    assert test_file.ids[:2] == ["test/0", "test/1"] and test_file.paths is None
    np.testing.assert_array_equal(test_file.labels, digits.labels)
    np.testing.assert_allclose(np.linalg.norm(test_file.vectors, axis=1), 1, atol=1e-5)
    assert test_file.metadata["data"] == {"name": "digits", "split": "test", "root": None, "kwargs": {}}
    assert test_file.metadata["run"]["kind"] == "run" and test_file.metadata["distance"] == "cosine"


def test_a_gallery_items_picture_embeds_to_its_stored_vector(embedder, test_file):
    index = SearchIndex.from_embeddings(test_file)
    pictures = [index.image(i) for i in ("test/0", "test/41")]
    assert pictures[0].size == (128, 128) and pictures[0].mode == "RGB"
    np.testing.assert_allclose(embedder.embed_images(pictures), test_file.vectors[[0, 41]], atol=1e-5)
    assert index.search(embedder.embed_images(pictures[1:]), 1)[0][0].id == "test/41"


def test_pictures_of_any_mode_and_size_become_digits_inputs():
    picture = Digits(split="test").picture(3)
    x = pictures_to_inputs({"kind": "dataset", "data": "digits"}, [picture])
    variants = [picture.convert("L"), picture.convert("RGBA"), picture.convert("P"), picture.convert("1"),
                ImageOps.invert(picture)]  # light ink on dark: the border tells the background
    for v in variants:
        np.testing.assert_array_equal(pictures_to_inputs({"kind": "dataset", "data": "digits"}, [v]), x)
    wide = Image.new("L", (40, 20), 255)  # a black bar on white, padded to 40x40: rows 20-24, block row 4
    wide.paste(0, (0, 10, 40, 15))
    y = pictures_to_inputs({"kind": "dataset", "data": "digits"}, [wide.convert("RGB")])[0, 0]
    want = np.zeros((8, 8), np.float32)
    want[4] = 1
    np.testing.assert_array_equal(y.numpy(), want)


def test_a_folder_of_pictures_embeds_like_the_data_set(embedder, test_file, tmp_path):
    digits = Digits(split="test")
    for i in (0, 1, 2, 5):
        folder = tmp_path / f"class{digits.labels[i]}"
        folder.mkdir(exist_ok=True)
        digits.picture(i).resize((64, 64), Image.NEAREST).save(folder / f"{i}.png")
    e = embed_data(embedder, str(tmp_path))
    assert e.metadata["data"]["name"] == "folder" and e.metadata["data"]["split"] == "all"
    assert len(e) == 4 and all(p.endswith(".png") for p in e.paths)
    by_path = {p.rsplit("/", 1)[1]: v for p, v in zip(e.paths, e.vectors)}
    for i in (0, 1, 2, 5):
        np.testing.assert_allclose(by_path[f"{i}.png"], test_file.vectors[i], atol=1e-5)


def test_feature_models_refuse_pictures():
    with pytest.raises(InputError, match="feature vectors"):
        pictures_to_inputs({"kind": "features", "data": "features"}, [Image.new("RGB", (2, 2))])
    with pytest.raises(InputError, match="no images"):
        pictures_to_inputs({"kind": "dataset", "data": "digits"}, [])
    with pytest.raises(InputError, match="PIL images"):
        pictures_to_inputs({"kind": "dataset", "data": "digits"}, [np.zeros((8, 8))])


def test_bad_sources(tmp_path, embedder):
    with pytest.raises(RunFolderError, match="neither a run folder"):
        load_embedder(tmp_path / "nothing")
    with pytest.raises(RunFolderError, match="not a run folder"):
        load_embedder(tmp_path)
    with pytest.raises(ExportError, match="not found"):
        load_embedder(tmp_path / "m.onnx")
    (tmp_path / "m.onnx").write_bytes(b"")
    with pytest.raises(ExportError, match="no metadata beside it"):
        load_embedder(tmp_path / "m.onnx")
    with pytest.raises(UnknownNameError, match="Did you mean 'digits'"):
        embed_data(embedder, "digit")
