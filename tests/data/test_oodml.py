"""ooDML splits (Milbich et al. 2021): FID, class swapping, split files and the ``oodml`` data set."""

import os
import pickle

import numpy as np
import pytest

from deepmetric import data
from deepmetric.data.oodml import (
    OODSplit,
    class_means,
    fid,
    load_splits,
    oodml_splits,
    save_splits,
    swap_splits,
)
from deepmetric.errors import DataError, InputError

NAMES = [f"c{i:02d}" for i in range(20)]


def _line_means(seed=0):
    """Known structure: class i sits at x = i on a line (tiny jitter in y)."""
    rng = np.random.default_rng(seed)
    return {n: np.array([float(i), 0.1 * rng.standard_normal()]) for i, n in enumerate(NAMES)}


def test_fid_by_hand_and_limits():
    train = np.array([[-1.0, 0], [1, 0], [0, -1], [0, 1]])  # mean 0, cov diag(2/3, 2/3)
    test = np.array([[3.0, 0], [5, 0], [4, -2], [4, 2]])  # mean (4, 0), cov diag(2/3, 8/3)
    # 16 + 2/3 + 2/3 + 2/3 + 8/3 - 2 (sqrt(4/9) + sqrt(16/9)) = 50/3
    assert fid(train, test) == pytest.approx(50 / 3, abs=1e-6)
    assert fid(test, train) == pytest.approx(50 / 3, abs=1e-6)
    assert fid(train, train) == pytest.approx(0, abs=1e-6)
    assert fid(train, train + [2.0, 0]) == pytest.approx(4, abs=1e-6)  # a pure shift: ‖Δμ‖²
    with pytest.raises(InputError):
        fid(train[:1], test)
    with pytest.raises(InputError):
        fid(train, test[:, :1])


def test_class_means():
    x = np.array([[1.0, 2], [3, 4], [10, 10], [5, 6]])
    classes, means = class_means(x, [7, 7, 2, 7])
    np.testing.assert_array_equal(classes, [2, 7])
    np.testing.assert_allclose(means, [[10, 10], [3, 4]])


@pytest.mark.parametrize("swaps", [1, 2])
def test_swapping_raises_fid_monotonically_on_known_structure(swaps):
    means = _line_means()
    train, test = NAMES[0::2], NAMES[1::2]  # interleaved: almost no shift
    seq = swap_splits(means, train, test, n_iter=6 if swaps == 1 else 3, swaps_per_iter=swaps, history=5)
    fids = [f for _, _, f in seq]
    assert np.all(np.diff(fids) > 0), fids
    for (tr0, te0, _), (tr1, te1, _) in zip(seq, seq[1:]):
        assert len(set(tr1) - set(tr0)) == swaps and len(set(te1) - set(te0)) == swaps  # swaps_per_iter each
        assert len(tr1) == len(tr0) and len(te1) == len(te0) and not set(tr1) & set(te1)
    if swaps == 1:  # one swap at a time reaches full separation: the low half trains, the high half tests
        assert seq[-1][0] == NAMES[:10] and seq[-1][1] == NAMES[10:]


def test_inverse_lowers_and_removal_shrinks_both_sides():
    means = _line_means()
    easier = swap_splits(means, NAMES[:10], NAMES[10:], n_iter=3, swaps_per_iter=1, inverse=True)
    assert easier[1][2] < easier[0][2]
    removal = swap_splits(means, NAMES[:10], NAMES[10:], n_iter=5, swaps_per_iter=1, removal=True)
    sizes = [(len(tr), len(te)) for tr, te, _ in removal]
    assert sizes == [(10, 10), (9, 9), (8, 8), (7, 7), (6, 6)]
    assert np.all(np.diff([f for _, _, f in removal]) > 0)


def test_generator_produces_increasing_splits_with_val_cuts():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(20), 5)
    features = np.stack([[float(c), 0.0] for c in labels]) + 0.05 * rng.standard_normal((100, 2))
    splits = oodml_splits(features, labels, NAMES, NAMES[0::2], NAMES[1::2], n_iter=8, swaps_per_iter=1,
                          easier_iter=2, removal_iter=3, keep=5)
    assert [s.id for s in splits] == [1, 2, 3, 4, 5]
    assert np.all(np.diff([s.fid for s in splits]) > 0)
    for s in splits:
        assert sorted(s.split_train + s.split_val) == s.train and not set(s.split_train) & set(s.split_val)
        assert len(s.split_val) == round(0.25 * len(s.train)) and not set(s.train) & set(s.test)


def _published(tmp_path):
    """A tiny file in the published layout: numpy floats, class-name lists, test_episodes by shots."""
    raw = {1: {"train": ["0", "1", "2"], "test": ["3", "4"], "fid": np.float64(12.5),
               "split_train": ["0", "1"], "split_val": ["2"],
               "test_episodes": {2: {1: {"3": ["a.png", "b.png"], "4": ["c.png", "d.png"]}}}},
           2: {"train": ["0", "3", "2"], "test": ["1", "4"], "fid": np.float64(30.0),
               "split_train": ["0", "3"], "split_val": ["2"], "test_episodes": {}}}
    path = tmp_path / "digits_splits.pkl"
    path.write_bytes(pickle.dumps(raw))
    return path


def test_published_split_file_loads_and_json_round_trips(tmp_path):
    splits = load_splits(_published(tmp_path))
    assert [s.id for s in splits] == [1, 2] and isinstance(splits[0].fid, float) and splits[0].fid == 12.5
    assert splits[0].train == ["0", "1", "2"] and splits[0].split_val == ["2"]
    assert splits[0].test_episodes == {2: {1: {"3": ["a.png", "b.png"], "4": ["c.png", "d.png"]}}}
    again = load_splits(save_splits(splits, tmp_path / "splits.json"))
    assert again == splits


def test_split_files_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return os.system, ("echo pwned",)

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({1: {"train": [Evil()], "test": []}}))
    with pytest.raises(DataError, match="refusing"):
        load_splits(path)
    with pytest.raises(DataError, match="not found"):
        load_splits(tmp_path / "missing.pkl")
    (tmp_path / "bad.json").write_text('{"1": {"train": ["0"]}}')
    with pytest.raises(DataError, match="'test'"):
        load_splits(tmp_path / "bad.json")


def test_oodml_data_set_selects_the_split_classes(tmp_path):
    path = save_splits([OODSplit(1, ["0", "2", "4", "6", "8"], ["1", "3", "5", "7", "9"], 5.0, ["0", "2", "4"],
                                 ["6", "8"])], tmp_path / "s.json")
    train = data.build("oodml", split="train", dataset="digits", splits=str(path), split_id=1)
    test = data.build("oodml", split="test", dataset="digits", splits=str(path), split_id=1)
    val = data.build("oodml", split="split_val", dataset="digits", splits=str(path), split_id=1)
    assert set(np.unique(train.labels)) == {0, 2, 4, 6, 8} and set(np.unique(test.labels)) == {1, 3, 5, 7, 9}
    assert set(np.unique(val.labels)) == {6, 8}
    assert train.augment and not test.augment  # the base data set's train-time augmentation follows the side
    with pytest.raises(DataError, match="no split 'val'"):
        data.build("oodml", split="val", dataset="digits", splits=str(path))
    bad = save_splits([OODSplit(1, ["0", "cat"], ["1", "2"], 1.0)], tmp_path / "bad.json")
    with pytest.raises(DataError, match="cat"):
        data.build("oodml", split="train", dataset="digits", splits=str(bad))
