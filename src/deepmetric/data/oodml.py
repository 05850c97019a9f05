"""ooDML: class splits of increasing train-test distribution shift (Milbich, Roth, Sinha, Schmidt,
Ghassemi & Ommer, "Characterizing Generalization under Out-Of-Distribution Shifts in Deep Metric
Learning", NeurIPS 2021; official code ``split_helpers.py`` / ``create_dataset_splits.py``).

* **Shift measure.** Each class is one point, the mean feature of its items. A Gaussian is fitted to the
  train class means and one to the test class means; the shift is their Fréchet distance
  ``FID = ‖μ_tr − μ_te‖² + Tr(Σ_tr + Σ_te − 2 (Σ_tr Σ_te)^{1/2})`` (:func:`fid`; ``εI``, ε = 1e-8, added to
  both covariances, the real part of the matrix square root kept).
* **Harder splits by class swapping** (:func:`swap_splits`). Per iteration the split is recorded, then the
  train classes are ranked by ``‖c − m_te‖ − ‖c − m_tr‖`` and the test classes by ``‖c − m_tr‖ − ‖c − m_te‖``
  (ascending: the most misplaced first; ``m`` = centroids of the class means), and ``swaps_per_iter``
  pairs are exchanged, the j-th swap taking the first candidates from rank j on that were not swapped
  within the last ``history`` swaps (slots, as the official code). ``inverse=True`` reverses the
  rankings (easier splits). With ``removal`` an iteration whose swaps do not raise the FID is undone
  and the classes it would have swapped are deleted from both sides (the paper's "R" splits; the public
  script tests ``>=`` here, which contradicts the stated purpose of making the shift larger).
* :func:`oodml_splits` chains easier, harder and removal sequences and keeps ``keep`` splits spread over
  the FID range, each with a class-disjoint ``split_train``/``split_val`` of its train classes.
* **Split files.** :func:`load_splits` reads the published pickles (``datasplits/<dataset>_splits.pkl``:
  ``{id: {train, test, fid, split_train, split_val, test_episodes}}``, read with an allow-list
  unpickler) and the JSON files :func:`save_splits` writes in the same structure.
* The data set ``oodml`` (``data.name: oodml``, ``data.kwargs: {dataset: digits, splits: <file>,
  split_id: 3}``) gives the train / test / split_train / split_val classes of one split of any
  registered data set, so every training configuration runs on ooDML splits.
"""

from __future__ import annotations

import io
import json
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import linalg

from deepmetric.data import DATASETS, register
from deepmetric.data.base import MetricDataset, Subset
from deepmetric.data.features import FeaturesDataset
from deepmetric.errors import ConfigError, DataError, InputError
from deepmetric.validation import as_int_labels


# ----------------------------------------------------------------------------------------------- statistics


def fid(train_means: np.ndarray, test_means: np.ndarray, eps: float = 1e-8) -> float:
    """Fréchet distance between Gaussians fitted to two sets of points (rows), float64.

    ``‖μ₁ − μ₂‖² + Tr(Σ₁) + Tr(Σ₂) − 2 Tr(((Σ₁ + εI)(Σ₂ + εI))^{1/2})`` with sample covariances
    (``np.cov``, ddof = 1) and the real part of ``scipy.linalg.sqrtm``, as the official ``metric_fid``.
    """
    a, b = np.asarray(train_means, dtype=np.float64), np.asarray(test_means, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise InputError(f"fid needs two [N, D] arrays of the same D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise InputError(f"fid needs at least 2 points per set for a covariance, got {len(a)} and {len(b)}")
    diff = a.mean(0) - b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    offset = np.eye(len(cov_a)) * eps
    covmean = linalg.sqrtm((cov_a + offset) @ (cov_b + offset)).real
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


def class_means(features, labels) -> tuple[np.ndarray, np.ndarray]:
    """``(classes [C], means [C, F])``: the mean feature of each class (sorted labels), float64."""
    x = np.asarray(features, dtype=np.float64)
    y = as_int_labels(labels)
    if x.ndim != 2 or len(x) != len(y):
        raise InputError(f"features must be [N, F] with N = len(labels) = {len(y)}, got {x.shape}")
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    sums = np.zeros((len(classes), x.shape[1]))
    np.add.at(sums, inverse, x)
    return classes, sums / counts[:, None]


# ----------------------------------------------------------------------------------------------- splits


@dataclass
class OODSplit:
    """One split: class names of each side, its FID, a class-disjoint train/val cut of the train classes
    and (published files only) ``test_episodes``: ``{shots: {episode: {class: [support file names]}}}``."""

    id: int
    train: list[str]
    test: list[str]
    fid: float
    split_train: list[str] = field(default_factory=list)
    split_val: list[str] = field(default_factory=list)
    test_episodes: dict[Any, Any] = field(default_factory=dict)


Recorded = list[tuple[list[str], list[str], float]]  # (train class names, test class names, FID) per split


def swap_splits(means: dict[str, np.ndarray], train: list[str], test: list[str], n_iter: int,
                swaps_per_iter: int = 2, history: int = 5, inverse: bool = False,
                removal: bool = False) -> Recorded:
    """The ``n_iter`` recorded ``(train, test, fid)`` of the class-swapping sequence (the first is the
    given split); ``means`` maps class name -> class-mean feature. See the module docstring."""
    train, test = list(train), list(test)
    if set(train) & set(test):
        raise ConfigError(f"train and test classes overlap: {sorted(set(train) & set(test))[:5]}")
    if swaps_per_iter > min(len(train), len(test)):
        raise ConfigError(f"swaps_per_iter={swaps_per_iter} exceeds the classes on one side "
                          f"({len(train)} train, {len(test)} test)")
    recorded = []
    done_train: list[int] = []
    done_test: list[int] = []
    for _ in range(n_iter):
        if min(len(train), len(test)) < 2:
            break
        f_tr, f_te = np.stack([means[c] for c in train]), np.stack([means[c] for c in test])
        current = fid(f_tr, f_te)
        recorded.append((sorted(train), sorted(test), current))
        m_tr, m_te = f_tr.mean(0), f_te.mean(0)
        dist = lambda f, m: np.linalg.norm(f - m, axis=1)  # noqa: E731
        rank_train = np.argsort(dist(f_tr, m_te) - dist(f_tr, m_tr), kind="stable")  # most test-like first
        rank_test = np.argsort(dist(f_te, m_tr) - dist(f_te, m_te), kind="stable")  # most train-like first
        if inverse:
            rank_train, rank_test = rank_train[::-1], rank_test[::-1]
        before = (list(train), list(test), len(done_train))
        for j in range(swaps_per_iter):
            recent_tr = done_train[-history:] if history else []
            recent_te = done_test[-history:] if history else []
            i_tr = next((int(i) for i in rank_train[j:] if i not in recent_tr), None)
            i_te = next((int(i) for i in rank_test[j:] if i not in recent_te), None)
            if i_tr is None or i_te is None:
                break
            done_train.append(i_tr)
            done_test.append(i_te)
            train[i_tr], test[i_te] = test[i_te], train[i_tr]
        if removal and fid(np.stack([means[c] for c in train]), np.stack([means[c] for c in test])) <= current:
            # undo this iteration's swaps and delete the classes it swapped from both sides
            gone_tr, gone_te = set(done_train[before[2]:]), set(done_test[before[2]:])
            del done_train[before[2]:], done_test[before[2]:]
            train = [c for i, c in enumerate(before[0]) if i not in gone_tr]
            test = [c for i, c in enumerate(before[1]) if i not in gone_te]
    return recorded


def _spread(candidates: Recorded, keep: int) -> Recorded:
    """Distinct splits sorted by FID, ``keep`` of them picked at evenly spaced FID targets."""
    unique: dict[tuple, tuple[list[str], list[str], float]] = {}
    for tr, te, f in candidates:
        unique.setdefault((tuple(tr), tuple(te)), (tr, te, f))
    ordered = sorted(unique.values(), key=lambda s: s[2])
    if len(ordered) <= keep:
        return ordered
    fids = np.array([s[2] for s in ordered])
    chosen: list[int] = []
    for target in np.linspace(fids[0], fids[-1], keep):  # increasing targets, each pick after the previous
        start = chosen[-1] + 1 if chosen else 0
        if start == len(ordered):
            break
        chosen.append(start + int(np.abs(fids[start:] - target).argmin()))
    return [ordered[i] for i in chosen]


def oodml_splits(features, labels, class_names, train_classes, test_classes, n_iter: int = 25,
                 swaps_per_iter: int = 2, history: int = 5, easier_iter: int = 0, easier_history: int = 30,
                 removal_iter: int = 0, keep: int = 8, val_fraction: float = 0.25, seed: int = 0) -> list[OODSplit]:
    """ooDML splits of a labelled data set from per-item ``features`` (any extractor; ``[N, F]``).

    ``class_names[label]`` names the classes; ``train_classes``/``test_classes`` (names) are the initial
    split. Runs the harder sequence (``n_iter`` iterations), the easier one (``easier_iter``, reversed
    rankings) and the removal sequence continuing from the hardest split (``removal_iter``), and keeps
    ``keep`` splits spread over the FID range, numbered 1.. in increasing FID.
    """
    classes, means = class_means(features, labels)
    by_name = {str(class_names[c]): m for c, m in zip(classes, means)}
    missing = [c for c in [*train_classes, *test_classes] if str(c) not in by_name]
    if missing:
        raise DataError(f"classes {missing[:5]} of the initial split have no items")
    train, test = [str(c) for c in train_classes], [str(c) for c in test_classes]
    harder = swap_splits(by_name, train, test, n_iter, swaps_per_iter, history)
    candidates = list(harder)
    if easier_iter:
        candidates += swap_splits(by_name, train, test, easier_iter, swaps_per_iter, easier_history, inverse=True)
    if removal_iter:
        last_train, last_test, _ = harder[-1]
        candidates += swap_splits(by_name, last_train, last_test, removal_iter, swaps_per_iter, history, removal=True)
    rng = np.random.default_rng(seed)
    splits = []
    for i, (tr, te, f) in enumerate(_spread(candidates, keep), start=1):
        n_val = max(1, int(round(val_fraction * len(tr))))
        val = sorted(rng.choice(tr, size=n_val, replace=False).tolist()) if len(tr) > n_val else []
        splits.append(OODSplit(i, tr, te, f, sorted(set(tr) - set(val)), val))
    return splits


# ----------------------------------------------------------------------------------------------- files

_ALLOWED = {
    ("builtins", name) for name in ("dict", "list", "tuple", "set", "frozenset", "str", "int", "float", "bool")
} | {
    ("collections", "OrderedDict"),
    ("numpy", "dtype"), ("numpy", "ndarray"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
}


class _SafeUnpickler(pickle.Unpickler):
    """Only plain containers, strings, numbers and numpy scalars/arrays: a split file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise DataError(f"split file refers to {module}.{name}, which a split file never needs; "
                            "refusing to load it")
        return super().find_class(module, name)


def _plain(value: Any) -> Any:
    """numpy scalars/arrays -> Python values (recursively), keys kept."""
    if isinstance(value, dict):
        return {k.item() if isinstance(k, np.generic) else k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


def load_splits(path: str | Path) -> list[OODSplit]:
    """The splits of a published ooDML pickle or of a JSON file written by :func:`save_splits`, by id."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"split file not found: {p}")
    try:
        if p.suffix == ".json":
            raw = {int(k): v for k, v in json.loads(p.read_text()).items()}
        else:
            raw = _plain(_SafeUnpickler(io.BytesIO(p.read_bytes())).load())
    except (pickle.UnpicklingError, json.JSONDecodeError, EOFError, ValueError) as exc:
        raise DataError(f"cannot read {p} as an ooDML split file: {exc}") from exc
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{p} must map split ids to splits ({{1: {{'train': [...], 'test': [...], 'fid': ...}}}})")
    splits = []
    for key in sorted(raw, key=int):
        entry = raw[key]
        if not isinstance(entry, dict) or not {"train", "test"} <= set(entry):
            raise DataError(f"split {key} of {p} has no 'train' and 'test' class lists")
        episodes = entry.get("test_episodes") or {}
        if p.suffix == ".json":  # JSON keys are strings: shots and episode ids back to int
            episodes = {int(s): {int(e): v for e, v in eps.items()} for s, eps in episodes.items()}
        splits.append(OODSplit(
            int(key), [str(c) for c in entry["train"]], [str(c) for c in entry["test"]],
            float(entry.get("fid", float("nan"))), [str(c) for c in entry.get("split_train", [])],
            [str(c) for c in entry.get("split_val", [])], episodes,
        ))
    return splits


def save_splits(splits: list[OODSplit], path: str | Path) -> Path:
    """Write splits as JSON in the published structure ``{id: {train, test, fid, split_train, ...}}``."""
    p = Path(path)
    p.write_text(json.dumps({str(s.id): {k: v for k, v in asdict(s).items() if k != "id"} for s in splits}, indent=1))
    return p


def get_split(splits: list[OODSplit], split_id: int) -> OODSplit:
    for s in splits:
        if s.id == split_id:
            return s
    raise ConfigError(f"no split {split_id}; the file has splits {[s.id for s in splits]}")


# ----------------------------------------------------------------------------------------------- data


class ClassUnion(MetricDataset):
    """The items of several splits of one data set, with labels made distinct across them."""

    def __init__(self, parts: list[MetricDataset]):
        self.parts = parts
        offsets = np.cumsum([0] + [int(p.labels.max()) + 1 for p in parts[:-1]])
        self.labels = np.concatenate([p.labels + o for p, o in zip(parts, offsets)])
        self.classes = [str(name) for p in parts for name in class_names(p)]
        self.input_kind = parts[0].input_kind
        self._where = np.concatenate([np.stack([np.full(len(p), i), np.arange(len(p))], 1)
                                      for i, p in enumerate(parts)])  # item -> (part, index in the part)
        if all(hasattr(p, "paths") for p in parts):
            self.paths = [path for p in parts for path in p.paths]

    def __getitem__(self, index: int):
        part, i = self._where[index]
        return self.parts[part][int(i)][0], int(self.labels[index])


def class_names(dataset: MetricDataset) -> list[str]:
    """``names[label]`` for labels ``0..max``: the data set's ``classes``, else the label as a string."""
    top = int(dataset.labels.max()) + 1
    names = list(dataset.classes or [])
    return [str(names[i]) if i < len(names) else str(i) for i in range(top)]


def all_classes(name: str, root: str | None = None, **kwargs: Any) -> MetricDataset:
    """Every class of the data set ``name``: its ``all`` split, or its ``train`` and ``test`` splits joined."""
    try:
        return DATASETS.build(name, root=root, split="all", **kwargs)
    except DataError as exc:
        if "split" not in str(exc):
            raise
    return ClassUnion([DATASETS.build(name, root=root, split=s, **kwargs) for s in ("train", "test")])


def dataset_features(dataset: MetricDataset, extractor: torch.nn.Module | None = None, batch_size: int = 256,
                     device: str | torch.device = "cpu") -> np.ndarray:
    """Per-item features for the class statistics: ``extractor``'s outputs, else the raw inputs flattened
    (a :class:`FeaturesDataset`'s rows; ``raw_features()`` where the data set has it)."""
    if extractor is not None:
        from deepmetric.inference import embed  # lazy: deepmetric.inference imports the data package

        return embed(extractor, dataset, batch_size, device)[0].numpy()
    if isinstance(dataset, FeaturesDataset):
        return dataset.features.numpy()
    if hasattr(type(dataset), "raw_features"):
        return dataset.raw_features().numpy()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    return torch.cat([torch.as_tensor(x).flatten(1).float() for x, _ in loader]).numpy()


@register("oodml")
def oodml(root: str | None = None, split: str = "train", dataset: str = "digits", splits: str | None = None,
          split_id: int = 1, augment: bool | None = None, normalization: str | None = None,
          **kwargs: Any) -> Subset:
    """One ooDML split of the registered data set ``dataset``: ``split`` = train, test, split_train or
    split_val picks those classes (by name) of split ``split_id`` of the file ``splits``."""
    if splits is None:
        raise DataError("data set 'oodml' needs splits=<split file (.pkl published or .json generated)>")
    sides = ("train", "test", "split_train", "split_val")
    if split not in sides:
        raise DataError(f"data set 'oodml' has no split {split!r}; valid splits: {', '.join(sides)}")
    chosen = get_split(load_splits(splits), split_id)
    params = DATASETS.parameters(dataset)
    if "augment" in params:
        kwargs["augment"] = split in ("train", "split_train") if augment is None else augment
    if normalization is not None and "normalization" in params:
        kwargs["normalization"] = normalization
    base = all_classes(dataset, root, **kwargs)
    names = class_names(base)
    wanted = getattr(chosen, split)
    index = {n: i for i, n in enumerate(names)}
    unknown = [c for c in wanted if c not in index]
    if unknown:
        raise DataError(f"split {split_id} lists classes {unknown[:5]} that {dataset!r} does not have "
                        f"(its classes look like {names[:3]})")
    return Subset(base, np.flatnonzero(np.isin(base.labels, [index[c] for c in wanted])))
