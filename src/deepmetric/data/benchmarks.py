"""The four standard DML benchmarks, read from their official archives exactly as they unpack.

=========  ==============================  ====================================  =====================
key        data set                        index read                            splits
=========  ==============================  ====================================  =====================
cub200     CUB-200-2011                    images.txt + image_class_labels.txt   train (classes 1-100), test (101-200)
cars196    Cars196                         cars_annos.mat (or CSV ``path,class``) train (classes 1-98), test (99-196)
sop        Stanford Online Products        Ebay_train.txt / Ebay_test.txt        train, test
inshop     In-Shop Clothes (DeepFashion)   Eval/list_eval_partition.txt          train, query, gallery
=========  ==============================  ====================================  =====================

All splits are zero-shot (train and test classes disjoint); the official *classification* splits
(CUB ``train_test_split.txt``, the Cars ``test`` flag) are not used. ``root`` is the unpacked folder
(``.../CUB_200_2011``) or the folder that contains it.

Labels are contiguous ``0..C-1`` within a split (In-Shop: ``query`` and ``gallery`` share one mapping
of the test items), ordered by original class id; ``class_ids[label]`` is the original id and
``classes[label]`` its name. SOP keeps its 12 super-classes in ``super_labels`` / ``super_classes``.

Each loader compares its image and class counts with the official ones and warns
(:class:`CountMismatchWarning`) naming what differs; images listed in the index but absent on disk are
dropped and listed in a warning. A missing folder or index file raises :class:`DataError` naming the
file, the expected layout and where the data set is published.

``augment`` (default: ``split == "train"``) picks the train augmentation or the test transform;
``pipeline`` (``default``, ``reality_check``, ``iaa``, ``iaa_cub``) and ``normalization``
(``imagenet``, ``bninception``, ``none``) choose the published image pipeline and the backbone's input
normalisation (see :mod:`deepmetric.data.transforms`).

Options: ``crop_boxes=True`` crops each image to its bounding box (CUB ``bounding_boxes.txt``, the Cars
``bbox_*`` fields or CSV columns ``x1,y1,x2,y2``, In-Shop ``Anno/list_bbox_inshop.txt``; unused by the
standard protocol, off by default); ``allow_truncated=False`` makes a truncated image file an error
instead of decoding it as far as it goes with a warning (see :func:`deepmetric.data.images.truncated_files`);
``check_files=False`` skips the per-image existence check.
"""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np

from deepmetric.data import register
from deepmetric.data.base import MetricDataset, check_split
from deepmetric.data.folder import ImageFolder, _listing
from deepmetric.data.images import load_rgb
from deepmetric.data.transforms import build_transform
from deepmetric.errors import DataError

register("image_folder")(ImageFolder)  # the re-arranged (Roth/DAS/ooDML) layouts: sorted class folders


class CountMismatchWarning(UserWarning):
    """A benchmark split does not have the official number of images or classes (partial copy?)."""


class Entry(NamedTuple):
    """One image of an index file: path relative to the data set root, original class id, split."""

    path: str
    class_id: Any
    split: str
    super_id: int | None = None
    box: tuple[float, float, float, float] | None = None  # (x1, y1, x2, y2) in pixels


class IndexedImageDataset(MetricDataset):
    """Base class: a list of ``(path, class id, split)`` read from a data set's official index files.

    Subclasses set the class attributes and implement :meth:`read_index` (and optionally
    :meth:`class_name`); this class resolves the root, checks files, remaps labels, validates counts
    and loads images.
    """

    input_kind = "image"
    key: ClassVar[str] = ""
    title: ClassVar[str] = ""
    folder: ClassVar[str] = ""  # top folder of the unpacked archive, tried under root
    marker: ClassVar[str] = ""  # an index file that identifies the data set root
    url: ClassVar[str] = ""
    layout: ClassVar[str] = ""
    splits: ClassVar[tuple[str, ...]] = ("train", "test")
    label_groups: ClassVar[dict[str, tuple[str, ...]]] = {}  # splits sharing one label mapping
    official: ClassVar[dict[str, tuple[int, int | None]]] = {}  # split -> (images, classes)

    def __init__(
        self,
        root: str | None = None,
        split: str = "train",
        transform: Any = None,
        augment: bool | None = None,
        image_size: int | None = None,
        pipeline: str = "default",
        normalization: str = "imagenet",
        check_files: bool = True,
        check_counts: bool = True,
        allow_truncated: bool = True,
        crop_boxes: bool = False,
    ):
        check_split(split, self.splits, self.key)
        if root is None:
            raise DataError(
                f"data set {self.key!r} needs root=<the unpacked {self.title} folder> (layout: {self.layout}); "
                f"it is published at {self.url}"
            )
        self.root = self._locate(Path(root).expanduser())
        self.split = split
        self.crop_boxes, self.allow_truncated = crop_boxes, allow_truncated
        entries = self.read_index(self.root)
        chosen = [e for e in entries if e.split == split]
        if not chosen:
            raise DataError(f"{self.title}: the index lists no images for split {split!r} under {self.root}")
        if check_files:
            chosen = self._drop_missing(chosen)
        group = self.label_groups.get(split)  # splits sharing a mapping keep every listed class
        source = [e for e in entries if e.split in group] if group else chosen
        ids = sorted({e.class_id for e in source})
        index = {cid: i for i, cid in enumerate(ids)}

        self.paths = [self.root / e.path for e in chosen]
        self.boxes = [e.box for e in chosen] if crop_boxes else None
        if crop_boxes and any(b is None for b in self.boxes):
            raise DataError(f"{self.title}: crop_boxes=True but the index gives no bounding box for some images")
        self.labels = np.asarray([index[e.class_id] for e in chosen], dtype=np.int64)
        self.class_ids = np.asarray(ids)
        self.classes = [self.class_name(cid) for cid in ids]
        if check_counts:
            self._check_counts(len(chosen), len({e.class_id for e in chosen}))
        augment = split == "train" if augment is None else augment
        self.transform = (
            transform
            if transform is not None
            else build_transform(augment, pipeline=pipeline, normalization=normalization, size=image_size)
        )
        self._loaded(chosen)

    def _loaded(self, entries: list[Entry]) -> None:
        """Hook: called with the split's entries (in item order) once labels are set."""

    # --- for subclasses -------------------------------------------------------------------------
    def read_index(self, root: Path) -> list[Entry]:
        raise NotImplementedError

    def class_name(self, class_id: Any) -> str:
        return str(class_id)

    # --- shared machinery -----------------------------------------------------------------------
    def _missing(self, path: Path) -> DataError:
        return DataError(
            f"{self.title}: missing {path}. Expected the official layout as it unpacks: {self.layout}. "
            f"The data set is published at {self.url}"
        )

    def _locate(self, root: Path) -> Path:
        for candidate in (root, root / self.folder):
            if (candidate / self.marker).exists():
                return candidate
        if not root.is_dir():
            raise DataError(f"{self.title}: data set folder not found: {root}. It is published at {self.url}")
        if (root / "images").is_dir() and any(p.is_dir() for p in (root / "images").iterdir()):
            raise DataError(
                f"{self.title}: {root} has no {self.marker} but holds class folders under images/ "
                f"(a re-arranged layout): use data set 'image_folder' with root={root / 'images'}"
            )
        raise self._missing(root / self.marker)

    def _require(self, path: Path) -> Path:
        if not path.exists():
            raise self._missing(path)
        return path

    def _drop_missing(self, entries: list[Entry]) -> list[Entry]:
        missing = [e for e in entries if not os.path.isfile(self.root / e.path)]
        if not missing:
            return entries
        if len(missing) == len(entries):
            first = self.root / entries[0].path
            raise DataError(
                f"{self.title}: none of the {len(entries)} images of split {self.split!r} exist "
                f"(e.g. {first}); is the image archive unpacked into {self.root}? Layout: {self.layout}"
            )
        warnings.warn(
            f"{self.title} split {self.split!r}: {len(missing)} image(s) listed in the index are missing "
            f"and were skipped: {_listing([e.path for e in missing])}",
            CountMismatchWarning,
            stacklevel=4,
        )
        gone = {e.path for e in missing}
        return [e for e in entries if e.path not in gone]

    def _check_counts(self, n_images: int, n_classes: int) -> None:
        want_images, want_classes = self.official.get(self.split, (None, None))
        diffs = []
        if want_images is not None and n_images != want_images:
            diffs.append(f"{n_images:,} image{'s' * (n_images != 1)} (official: {want_images:,})")
        if want_classes is not None and n_classes != want_classes:
            diffs.append(f"{n_classes:,} class{'es' * (n_classes != 1)} (official: {want_classes:,})")
        if diffs:
            warnings.warn(
                f"{self.title} split {self.split!r} under {self.root} has {' and '.join(diffs)}; "
                f"a partial or modified copy gives results that are not comparable with published ones",
                CountMismatchWarning,
                stacklevel=4,
            )

    @property
    def class_counts(self) -> np.ndarray:
        """Images per label (``class_counts[label]``; zeros for shared-mapping classes absent here)."""
        return np.bincount(self.labels, minlength=len(self.class_ids))

    def __getitem__(self, index: int):
        img = load_rgb(self.paths[index], allow_truncated=self.allow_truncated)
        if self.boxes is not None:
            x1, y1, x2, y2 = self.boxes[index]
            img = img.crop((max(0, int(x1)), max(0, int(y1)), min(img.width, int(x2)), min(img.height, int(y2))))
        return self.transform(img), int(self.labels[index])


def _read_rows(path: Path, columns: int, skip: int = 0) -> list[list[str]]:
    """Whitespace-separated rows of exactly ``columns`` fields after ``skip`` header lines."""
    rows = []
    for n, line in enumerate(path.read_text().splitlines()[skip:], skip + 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != columns:
            raise DataError(f"{path}, line {n}: expected {columns} columns, got {line!r}")
        rows.append(parts)
    return rows


def _read_pairs(path: Path) -> list[tuple[str, str]]:
    """Lines ``"<key> <value>"`` (value may contain no spaces); blank lines skipped."""
    pairs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise DataError(f"{path}, line {n}: expected '<id> <value>', got {line!r}")
        pairs.append((parts[0], parts[1]))
    return pairs


def _int(value: Any, path: Path, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DataError(f"{path}: {what} {value!r} is not an integer") from None


@register("cub200")
class CUB200(IndexedImageDataset):
    """CUB-200-2011 birds (Wah et al 2011), official archive: train = classes 1-100, test = 101-200

    The classification split (train_test_split.txt) is ignored; splits are zero-shot.
    """

    key, title, folder, marker = "cub200", "CUB-200-2011", "CUB_200_2011", "images.txt"
    url = "https://www.vision.caltech.edu/datasets/cub_200_2011/ (CUB_200_2011.tgz)"
    layout = "CUB_200_2011/{images.txt, image_class_labels.txt, classes.txt, images/<NNN.Name>/<file>.jpg}"
    official = {"train": (5864, 100), "test": (5924, 100)}

    def read_index(self, root: Path) -> list[Entry]:
        images_txt = self._require(root / "images.txt")
        labels_txt = self._require(root / "image_class_labels.txt")
        self._require(root / "images")
        labels = {k: _int(v, labels_txt, "class id") for k, v in _read_pairs(labels_txt)}
        classes_txt = root / "classes.txt"
        self._names = {_int(k, classes_txt, "class id"): v for k, v in _read_pairs(classes_txt)} if classes_txt.exists() else {}
        boxes: dict[str, tuple[float, float, float, float]] = {}
        if self.crop_boxes:  # "<image_id> <x> <y> <width> <height>"
            for image_id, *xywh in _read_rows(self._require(root / "bounding_boxes.txt"), 5):
                x, y, w, h = map(float, xywh)
                boxes[image_id] = (x, y, x + w, y + h)
        entries = []
        for image_id, rel in _read_pairs(images_txt):
            if image_id not in labels:
                raise DataError(f"{labels_txt} has no class for image id {image_id} ({rel}) of {images_txt}")
            cid = labels[image_id]
            entries.append(Entry(f"images/{rel}", cid, "train" if cid <= 100 else "test", box=boxes.get(image_id)))
        return entries

    def class_name(self, class_id: Any) -> str:
        return self._names.get(class_id, str(class_id))


@register("cars196")
class Cars196(IndexedImageDataset):
    """Stanford Cars196 (Krause et al 2013), cars_annos.mat or CSV: train = classes 1-98, test = 99-196

    Reads ``cars_annos.mat`` (needs scipy) or a CSV conversion with columns ``path,class`` (paths relative
    to root); ``annotations=`` names another file. The classification distribution (``cars_train/``,
    ``cars_test/``, ``devkit/cars_train_annos.mat`` plus the separately shipped
    ``cars_test_annos_withlabels.mat``) is merged before the class split.
    """

    key, title, folder, marker = "cars196", "Cars196", "", ""
    url = "https://ai.stanford.edu/~jkrause/cars/car_dataset.html (car_ims.tgz + cars_annos.mat)"
    layout = (
        "<root>/{cars_annos.mat (or cars_annos.csv with columns path,class), car_ims/000001.jpg ...}, or the "
        "classification distribution <root>/{cars_train/, cars_test/, devkit/cars_train_annos.mat, "
        "cars_test_annos_withlabels.mat}"
    )
    official = {"train": (8054, 98), "test": (8131, 98)}
    candidates = ("cars_annos.mat", "cars_annos.csv")

    def __init__(
        self,
        root: str | None = None,
        split: str = "train",
        transform: Any = None,
        augment: bool | None = None,
        image_size: int | None = None,
        pipeline: str = "default",
        normalization: str = "imagenet",
        check_files: bool = True,
        check_counts: bool = True,
        allow_truncated: bool = True,
        crop_boxes: bool = False,
        annotations: str | None = None,
    ):
        self._annotations = annotations
        super().__init__(
            root, split, transform=transform, augment=augment, image_size=image_size, pipeline=pipeline,
            normalization=normalization, check_files=check_files, check_counts=check_counts,
            allow_truncated=allow_truncated, crop_boxes=crop_boxes,
        )

    def _locate(self, root: Path) -> Path:
        self._devkit: tuple[Path, Path] | None = None
        if self._annotations is not None:
            ann = Path(self._annotations)
            ann = ann if ann.is_absolute() else root / ann
            self._require(ann)
            self._ann_path = ann
            return root
        bases = (root, root / "stanford_cars", root / "cars196")
        for base in bases:
            for name in self.candidates:
                if (base / name).is_file():
                    self._ann_path = base / name
                    return base
        for base in bases:  # the classification distribution: cars_train/, cars_test/, devkit/
            train = base / "devkit" / "cars_train_annos.mat"
            if train.is_file():
                tests = [base / "cars_test_annos_withlabels.mat", base / "devkit" / "cars_test_annos_withlabels.mat"]
                test = next((t for t in tests if t.is_file()), None)
                if test is None:
                    raise DataError(
                        f"{self.title}: found the classification distribution in {base} (devkit/cars_train_annos.mat) "
                        f"but not the test labels cars_test_annos_withlabels.mat, which ship separately; put it in "
                        f"{base} or {base / 'devkit'}. The data set is published at {self.url}"
                    )
                self._devkit = (train, test)
                return base
        if not root.is_dir():
            raise DataError(f"{self.title}: data set folder not found: {root}. It is published at {self.url}")
        raise DataError(
            f"{self.title}: missing {root / 'cars_annos.mat'} (or a CSV conversion {root / 'cars_annos.csv'} with "
            f"columns path,class). Expected layout: {self.layout}. The data set is published at {self.url}"
        )

    def read_index(self, root: Path) -> list[Entry]:
        self._names: dict[int, str] = {}
        if self._devkit is not None:
            train, test = self._devkit
            rows = self._read_mat(train, "fname", "cars_train/") + self._read_mat(test, "fname", "cars_test/")
            if (root / "devkit" / "cars_meta.mat").is_file():
                self._read_names(root / "devkit" / "cars_meta.mat")
        else:
            ann = self._ann_path
            rows = self._read_csv(ann) if ann.suffix.lower() == ".csv" else self._read_mat(ann)
        return [Entry(path, cid, "train" if cid <= 98 else "test", box=box) for path, cid, box in rows]

    @staticmethod
    def _loadmat(path: Path) -> dict[str, Any]:
        try:
            from scipy.io import loadmat
        except ImportError:  # pragma: no cover - scipy is a dependency of scikit-learn
            raise DataError(
                f"reading {path} needs scipy (pip install scipy); or convert it to a CSV with columns path,class"
            ) from None
        try:
            return loadmat(str(path), squeeze_me=True)
        except Exception as exc:  # noqa: BLE001 - scipy raises several types for a bad file
            raise DataError(f"cannot read {path} as a MATLAB file: {exc}") from exc

    def _read_names(self, path: Path) -> None:
        mat = self._loadmat(path)
        if "class_names" in mat:
            self._names = {i + 1: str(n) for i, n in enumerate(np.atleast_1d(mat["class_names"]))}

    def _read_mat(self, path: Path, path_field: str = "relative_im_path", prefix: str = "") -> list[tuple[str, int, Any]]:
        """An ``annotations`` struct array: image path field, ``class`` (1-based), ``bbox_x1 .. bbox_y2``."""
        mat = self._loadmat(path)
        if "annotations" not in mat:
            raise DataError(f"{path} has no 'annotations' struct array (found: {', '.join(k for k in mat if not k.startswith('__'))})")
        ann = np.atleast_1d(mat["annotations"])
        fields = ann.dtype.names or ()
        if path_field not in fields or "class" not in fields:
            raise DataError(f"{path}: 'annotations' needs fields {path_field} and class, has {', '.join(fields)}")
        if "class_names" in mat:
            self._names = {i + 1: str(n) for i, n in enumerate(np.atleast_1d(mat["class_names"]))}
        box_fields = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")
        has_box = all(f in fields for f in box_fields)
        return [
            (prefix + str(a[path_field]), _int(a["class"], path, "class"),
             tuple(float(a[f]) for f in box_fields) if has_box else None)
            for a in ann
        ]

    def _read_csv(self, path: Path) -> list[tuple[str, int, Any]]:
        """Columns ``path,class``; optional ``x1,y1,x2,y2`` bounding boxes."""
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"path", "class"} <= set(reader.fieldnames):
                raise DataError(f"{path}: a Cars196 CSV needs a header with columns path,class; got {reader.fieldnames}")
            has_box = {"x1", "y1", "x2", "y2"} <= set(reader.fieldnames)
            return [
                (row["path"], _int(row["class"], path, "class"),
                 tuple(float(row[k]) for k in ("x1", "y1", "x2", "y2")) if has_box else None)
                for row in reader
            ]

    def class_name(self, class_id: Any) -> str:
        return self._names.get(class_id, str(class_id))


@register("sop")
class StanfordOnlineProducts(IndexedImageDataset):
    """Stanford Online Products (Oh Song et al 2016): 11,318 train / 11,316 test products, super-classes kept

    ``super_labels[i]`` is the super-class (0..11) of item ``i``; ``super_classes`` names them. The
    re-arranged layout of Roth et al. (``online_products/Info_Files/Ebay_*.txt`` with the images under
    ``online_products/images/``) is read too.
    """

    key, title, folder = "sop", "Stanford Online Products", "Stanford_Online_Products"
    marker = "Ebay_train.txt"
    url = "https://cvgl.stanford.edu/projects/lifted_struct/ (Stanford_Online_Products.zip)"
    layout = "Stanford_Online_Products/{Ebay_train.txt, Ebay_test.txt, <super>_final/<id>_<n>.JPG}"
    official = {"train": (59551, 11318), "test": (60502, 11316)}
    SUPER_CLASSES = ("bicycle", "cabinet", "chair", "coffee_maker", "fan", "kettle",
                     "lamp", "mug", "sofa", "stapler", "table", "toaster")

    def _locate(self, root: Path) -> Path:
        self._index_dir, self._prefix = "", ""
        for candidate in (root, root / self.folder):
            if (candidate / self.marker).exists():
                return candidate
        for candidate in (root, root / "online_products"):  # Roth et al.: Info_Files/ + images/
            if (candidate / "Info_Files" / self.marker).exists():
                self._index_dir, self._prefix = "Info_Files/", "images/"
                return candidate
        return super()._locate(root)

    def read_index(self, root: Path) -> list[Entry]:
        path = self._require(root / f"{self._index_dir}Ebay_{self.split}.txt")
        lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
        if not lines or lines[0][:3] != ["image_id", "class_id", "super_class_id"]:
            raise DataError(f"{path}: expected the header 'image_id class_id super_class_id path'")
        entries = []
        for n, parts in enumerate(lines[1:], 2):
            if len(parts) != 4:
                raise DataError(f"{path}, line {n}: expected 4 columns, got {' '.join(parts)!r}")
            cid, super_id = _int(parts[1], path, "class_id"), _int(parts[2], path, "super_class_id")
            entries.append(Entry(self._prefix + parts[3], cid, self.split, super_id))
        return entries

    def _loaded(self, entries: list[Entry]) -> None:
        supers = np.asarray([e.super_id for e in entries], dtype=np.int64)
        self.super_class_ids = np.unique(supers)
        self.super_labels = np.searchsorted(self.super_class_ids, supers).astype(np.int64)
        self.super_classes = [
            self.SUPER_CLASSES[s - 1] if 1 <= s <= len(self.SUPER_CLASSES) else str(s) for s in self.super_class_ids
        ]


@register("inshop")
class InShop(IndexedImageDataset):
    """In-Shop Clothes Retrieval (DeepFashion, Liu et al 2016): splits train, query and gallery

    Labels are item ids: train items map to ``0..3996``; ``query`` and ``gallery`` share one mapping of
    the test items, so a query's label equals its matches' labels in the gallery.
    """

    key, title, folder = "inshop", "In-Shop Clothes Retrieval", "InShop"
    marker = "Eval/list_eval_partition.txt"
    url = "https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html (Img/img.zip, Eval/list_eval_partition.txt)"
    layout = "<root>/{Eval/list_eval_partition.txt, img/{MEN,WOMEN}/<Category>/id_XXXXXXXX/<file>.jpg (or img_highres/)}"
    splits = ("train", "query", "gallery")
    label_groups = {"query": ("query", "gallery"), "gallery": ("query", "gallery")}
    official = {"train": (25882, 3997), "query": (14218, None), "gallery": (12612, None)}

    def _locate(self, root: Path) -> Path:
        for candidate in (root, root / self.folder, root / "In-shop Clothes Retrieval Benchmark"):
            if (candidate / self.marker).exists():
                return candidate
        return super()._locate(root)

    def read_index(self, root: Path) -> list[Entry]:
        path = self._require(root / self.marker)
        lines = path.read_text().splitlines()
        if len(lines) < 2 or lines[1].split()[:3] != ["image_name", "item_id", "evaluation_status"]:
            raise DataError(
                f"{path}: expected line 1 = the image count and line 2 = 'image_name item_id evaluation_status'"
            )
        img = "img"
        if not (root / "img").is_dir() and (root / "img_highres").is_dir():
            img = "img_highres"
        elif not (root / "img").is_dir():
            raise self._missing(root / "img")
        boxes = self._boxes(root) if self.crop_boxes else {}
        entries = []
        for n, line in enumerate(lines[2:], 3):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 3 or parts[2] not in self.splits:
                raise DataError(f"{path}, line {n}: expected '<image_name> <item_id> train|query|gallery', got {line!r}")
            rel = parts[0]
            box = boxes.get(rel)
            if img != "img" and rel.startswith("img/"):
                rel = img + rel[3:]
            entries.append(Entry(rel, parts[1], parts[2], box=box))
        return entries

    def _boxes(self, root: Path) -> dict[str, tuple[float, float, float, float]]:
        """Anno/list_bbox_inshop.txt: count, header, then ``image_name clothes_type pose_type x_1 y_1 x_2 y_2``."""
        rows = _read_rows(self._require(root / "Anno" / "list_bbox_inshop.txt"), 7, skip=2)
        return {r[0]: (float(r[3]), float(r[4]), float(r[5]), float(r[6])) for r in rows}


BENCHMARKS: dict[str, type[IndexedImageDataset]] = {
    c.key: c for c in (CUB200, Cars196, StanfordOnlineProducts, InShop)
}

__all__: Sequence[str] = [
    "BENCHMARKS", "CUB200", "Cars196", "CountMismatchWarning", "Entry", "InShop", "IndexedImageDataset",
    "StanfordOnlineProducts",
]
