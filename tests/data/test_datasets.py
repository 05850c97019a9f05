import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from deepmetric import data
from deepmetric.data.base import select_classes, split_classes
from deepmetric.errors import ConfigError, DataError, LabelError, UnknownNameError


def test_registry():
    assert {"digits", "folder", "features"} <= set(data.available())
    with pytest.raises(UnknownNameError, match="Did you mean 'digits'"):
        data.build("digit")


def test_digits_zero_shot_split():
    train, test = data.build("digits", split="train"), data.build("digits", split="test")
    assert set(train.labels.tolist()) == {0, 1, 2, 3, 4} and set(test.labels.tolist()) == {5, 6, 7, 8, 9}
    assert len(train) + len(test) == 1797
    x, y = test[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
    assert isinstance(y, int) and train.labels.dtype == np.int64
    assert test.raw_features().shape == (len(test), 64)
    with pytest.raises(DataError, match="valid splits"):
        data.build("digits", split="validation")


def test_digits_augmentation_only_on_train():
    test = data.build("digits", split="test")
    assert torch.equal(test[3][0], test[3][0])
    train = data.build("digits", split="train")
    torch.manual_seed(0)
    shifted = [train[0][0] for _ in range(20)]
    assert any(not torch.equal(shifted[0], s) for s in shifted)
    assert all(s.shape == (1, 8, 8) for s in shifted)


def test_validation_classes_are_disjoint_and_seeded():
    labels = data.build("digits", split="train").labels
    kept, held = split_classes(labels, 2, seed=0)
    assert len(held) == 2 and len(kept) == 3 and not set(kept) & set(held)
    assert np.array_equal(split_classes(labels, 2, seed=0)[1], held)
    kept_f, held_f = split_classes(np.repeat(np.arange(10), 3), 0.2, seed=1)
    assert len(held_f) == 2
    with pytest.raises(ConfigError, match="at least 2 held-out"):
        split_classes(labels, 1)
    with pytest.raises(ConfigError, match="2 remaining"):
        split_classes(labels, 4)
    subset = select_classes(data.build("digits", split="train"), held)
    assert set(subset.labels.tolist()) == set(held.tolist())
    assert subset[0][1] in held


def _image(path, mode="RGB", size=(12, 10)):
    Image.new(mode, size, color=0 if mode == "L" else None).save(path)


@pytest.fixture
def image_root(tmp_path):
    for c, n in {"cat": 3, "dog": 2, "emu": 2, "fox": 2}.items():
        (tmp_path / c).mkdir()
        for i in range(n):
            _image(tmp_path / c / f"{i}.png")
    Image.new("CMYK", (9, 9)).save(tmp_path / "cat" / "cmyk.jpg")
    _image(tmp_path / "dog" / "grey.png", mode="L")
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"not an image at all")
    (tmp_path / "dog" / "notes.txt").write_text("ignored: not an image extension")
    (tmp_path / "gnu").mkdir()  # empty class
    return tmp_path


def test_image_folder_zero_shot_halves_and_bad_files(image_root):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train = data.build("folder", root=str(image_root), split="train", image_size=8)
    messages = " ".join(str(w.message) for w in caught)
    assert "broken.jpg" in messages and "unreadable" in messages
    # classes sorted: cat dog emu fox gnu -> first half (3) train: cat, dog, emu
    assert train.classes == ["cat", "dog", "emu"]
    assert np.bincount(train.labels).tolist() == [4, 3, 2]  # cat + cmyk, dog + grey - broken
    for i in range(len(train)):
        x, y = train[i]
        assert x.shape == (3, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        test = data.build("folder", root=str(image_root), split="test", image_size=8)
    assert test.classes == ["fox"] and "gnu" in " ".join(str(w.message) for w in caught)


def test_image_folder_named_split_folders(tmp_path):
    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            _image(tmp_path / split / c / "x.png")
    ds = data.build("folder", root=str(tmp_path), split="test", image_size=8, augment=False)
    assert ds.classes == ["a", "b"] and len(ds) == 2


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        data.build("folder", root=str(tmp_path / "missing"))
    with pytest.raises(DataError, match="needs root"):
        data.build("folder")
    (tmp_path / "a").mkdir()
    with pytest.warns(UserWarning, match="without images"), pytest.raises(DataError, match="no readable images"):
        data.build("folder", root=str(tmp_path), split="all")
    with pytest.raises(DataError, match="valid splits"):
        data.build("folder", root=str(tmp_path), split="query")


def test_features_dataset(tmp_path):
    path = tmp_path / "f.npz"
    np.savez(path, train_features=np.random.rand(6, 3), train_labels=np.array([0, 0, 1, 1, 2, 2]))
    ds = data.build("features", root=str(path), split="train")
    assert len(ds) == 6 and ds[1][0].shape == (3,) and ds.labels.dtype == np.int64
    with pytest.raises(DataError, match="test_features"):
        data.build("features", root=str(path), split="test")
    with pytest.raises(DataError, match="not found"):
        data.build("features", root=str(tmp_path / "nope.npz"))
    bad = tmp_path / "bad.npz"
    np.savez(bad, train_features=np.random.rand(3, 2), train_labels=np.array([0.5, 1.0, 2.0]))
    with pytest.raises(LabelError, match="integer"):
        data.build("features", root=str(bad))
    bad.write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read"):
        data.build("features", root=str(bad))
    from deepmetric.data.features import FeaturesDataset

    with pytest.raises(DataError, match="NaN"):
        FeaturesDataset(np.array([[np.nan, 1.0]]), [0])
    with pytest.raises(LabelError, match="integer"):
        FeaturesDataset(np.ones((2, 2)), ["cat", "dog"])
