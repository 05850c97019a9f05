"""The benchmark loaders on tiny copies of each official archive layout (real file names and formats)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from deepmetric import data
from deepmetric.data.benchmarks import CUB200, CountMismatchWarning
from deepmetric.data.transforms import build_transform, image_transform, normalization_for
from deepmetric.errors import ConfigError, DataError

SIZE = dict(image_size=8)


def _jpg(path, mode="RGB", color=(200, 30, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (12, 10), color=color if mode == "RGB" else 90).save(path, format="JPEG")


def _quiet(name, **kw):
    """Build a fixture data set: its counts never match the official ones, so silence that warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CountMismatchWarning)
        return data.build(name, **SIZE, **kw)


# --- fixture builders: the official layouts ---------------------------------------------------------

CUB_CLASSES = {1: "001.Black_footed_Albatross", 2: "002.Laysan_Albatross", 100: "100.Brown_Pelican",
               101: "101.White_Pelican", 150: "150.Sage_Thrasher", 200: "200.Common_Yellowthroat"}


@pytest.fixture
def cub_root(tmp_path):
    root = tmp_path / "CUB_200_2011"
    images, labels, split, boxes = [], [], [], []
    image_id = 0
    for cid, name in CUB_CLASSES.items():
        for n in range(2):
            image_id += 1
            rel = f"{name}/{name.split('.')[1]}_{n:04d}_{796111 + image_id}.jpg"
            _jpg(root / "images" / rel, mode="L" if image_id == 3 else "RGB")  # one greyscale JPEG
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {cid}")
            split.append(f"{image_id} {image_id % 2}")
            boxes.append(f"{image_id} 1.0 1.0 5.0 5.0")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "classes.txt").write_text("\n".join(f"{c} {n}" for c, n in CUB_CLASSES.items()) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (root / "bounding_boxes.txt").write_text("\n".join(boxes) + "\n")
    return root


CARS = [(1, 1), (2, 1), (3, 98), (4, 99), (5, 99), (6, 196), (7, 50)]  # (image number, class)


def _cars_images(root):
    for n, _ in CARS:
        _jpg(root / "car_ims" / f"{n:06d}.jpg")


@pytest.fixture
def cars_root(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    root = tmp_path / "cars"
    _cars_images(root)
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    ann = np.zeros((1, len(CARS)), dtype=[(f, "O") for f in fields])
    u8 = lambda v: np.array([[v]], dtype=np.uint8)  # noqa: E731 - as MATLAB stores them
    for i, (n, cls) in enumerate(CARS):
        ann[0, i] = (np.array([f"car_ims/{n:06d}.jpg"]), u8(1), u8(2), u8(9), u8(8), u8(cls), u8(i % 2))
    names = np.empty((1, 196), dtype=object)
    names[0, :] = [f"Make Model {c}" for c in range(1, 197)]
    scipy_io.savemat(root / "cars_annos.mat", {"annotations": ann, "class_names": names})
    return root


@pytest.fixture
def sop_root(tmp_path):
    root = tmp_path / "Stanford_Online_Products"
    train = [(1, 1, 1, "bicycle_final/111085122871_0.JPG"), (2, 1, 1, "bicycle_final/111085122871_1.JPG"),
             (3, 2, 1, "bicycle_final/111265328556_0.JPG"), (4, 3, 2, "cabinet_final/110742010557_0.JPG"),
             (5, 3, 2, "cabinet_final/110742010557_1.JPG")]
    test = [(6, 11319, 3, "chair_final/111076003113_0.JPG"), (7, 11319, 3, "chair_final/111076003113_1.JPG"),
            (8, 11320, 12, "toaster_final/111196101112_0.JPG"), (9, 11321, 12, "toaster_final/111196101113_0.JPG")]
    for name, rows in (("Ebay_train.txt", train), ("Ebay_test.txt", test)):
        lines = ["image_id class_id super_class_id path"] + [" ".join(map(str, r)) for r in rows]
        root.mkdir(exist_ok=True)
        (root / name).write_text("\n".join(lines) + "\n")
        for *_, rel in rows:
            _jpg(root / rel)
    (root / "Ebay_info.txt").write_text("image_id class_id super_class_id path\n")
    return root


INSHOP = [  # image_name item_id evaluation_status
    ("img/WOMEN/Dresses/id_00000001/02_1_front.jpg", "id_00000001", "train"),
    ("img/WOMEN/Dresses/id_00000001/02_2_side.jpg", "id_00000001", "train"),
    ("img/MEN/Denim/id_00000003/01_1_front.jpg", "id_00000003", "train"),
    ("img/WOMEN/Dresses/id_00000002/02_1_front.jpg", "id_00000002", "query"),
    ("img/WOMEN/Dresses/id_00000002/02_2_side.jpg", "id_00000002", "gallery"),
    ("img/WOMEN/Dresses/id_00000002/02_3_back.jpg", "id_00000002", "gallery"),
    ("img/MEN/Tees_Tanks/id_00000007/01_1_front.jpg", "id_00000007", "query"),
    ("img/MEN/Tees_Tanks/id_00000007/01_2_side.jpg", "id_00000007", "gallery"),
    ("img/MEN/Tees_Tanks/id_00000005/01_2_side.jpg", "id_00000005", "gallery"),  # gallery-only item
]


def _inshop(root, img="img"):
    (root / "Eval").mkdir(parents=True)
    lines = [str(len(INSHOP)), "image_name item_id evaluation_status"]
    lines += [f"{p:<60}{i:<15}{s}" for p, i, s in INSHOP]  # the file pads its columns with spaces
    (root / "Eval" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    (root / "Anno").mkdir()
    boxes = [f"{p:<60}1  1  2  3  9  8" for p, _, _ in INSHOP]
    header = [str(len(INSHOP)), "image_name clothes_type pose_type x_1 y_1 x_2 y_2"]
    (root / "Anno" / "list_bbox_inshop.txt").write_text("\n".join(header + boxes) + "\n")
    for p, _, _ in INSHOP:
        _jpg(root / (img + p[3:]))
    return root


# --- CUB-200-2011 -----------------------------------------------------------------------------------

def test_cub_zero_shot_split_labels_and_names(cub_root):
    train = _quiet("cub200", root=str(cub_root), split="train")
    test = _quiet("cub200", root=str(cub_root.parent), split="test")  # the folder holding CUB_200_2011/ works too
    assert train.class_ids.tolist() == [1, 2, 100] and test.class_ids.tolist() == [101, 150, 200]
    assert train.classes == ["001.Black_footed_Albatross", "002.Laysan_Albatross", "100.Brown_Pelican"]
    assert train.labels.dtype == np.int64 and train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert test.class_counts.tolist() == [2, 2, 2] and test.num_classes == 3 and len(test) == 6
    assert train.input_kind == "image" and all(p.is_file() for p in train.paths)
    for i in range(len(train)):  # includes the greyscale JPEG
        x, y = train[i]
        assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and y == train.labels[i]


def test_cub_count_mismatch_warns_with_official_numbers(cub_root, monkeypatch):
    with pytest.warns(CountMismatchWarning, match=r"6 images \(official: 5,864\) and 3 classes \(official: 100\)"):
        data.build("cub200", root=str(cub_root), split="train", **SIZE)
    monkeypatch.setattr(CUB200, "official", {"train": (6, 3), "test": (6, 3)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data.build("cub200", root=str(cub_root), split="train", **SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monkeypatch.undo()
        data.build("cub200", root=str(cub_root), split="train", check_counts=False, **SIZE)


def test_cub_missing_image_is_skipped_and_listed(cub_root):
    victim = sorted((cub_root / "images" / "150.Sage_Thrasher").iterdir())[0]
    victim.unlink()
    with pytest.warns(CountMismatchWarning) as record:
        test = data.build("cub200", root=str(cub_root), split="test", **SIZE)
    messages = " ".join(str(w.message) for w in record)
    assert victim.name in messages and "missing" in messages
    assert len(test) == 5 and test.class_counts.tolist() == [2, 1, 2]


def test_cub_missing_files_name_the_file_and_the_source(cub_root, tmp_path):
    (cub_root / "image_class_labels.txt").unlink()
    with pytest.raises(DataError, match=r"image_class_labels\.txt.*caltech"):
        data.build("cub200", root=str(cub_root))
    with pytest.raises(DataError, match="not found"):
        data.build("cub200", root=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="needs root"):
        data.build("cub200")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"missing .*images\.txt"):
        data.build("cub200", root=str(empty))
    with pytest.raises(DataError, match="valid splits"):
        data.build("cub200", root=str(cub_root), split="query")


def test_rearranged_layout_points_to_image_folder(tmp_path):
    for c in ("001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross", "004.Crested_Auklet"):
        _jpg(tmp_path / "cub200" / "images" / c / "a.jpg")
    with pytest.raises(DataError, match="image_folder"):
        data.build("cub200", root=str(tmp_path / "cub200"))
    ds = data.build("image_folder", root=str(tmp_path / "cub200" / "images"), split="train", image_size=8)
    assert ds.classes == ["001.Black_footed_Albatross", "002.Laysan_Albatross"]


# --- Cars196 ----------------------------------------------------------------------------------------

def test_cars_mat_split_ignores_classification_flag(cars_root):
    train = _quiet("cars196", root=str(cars_root), split="train")
    test = _quiet("cars196", root=str(cars_root), split="test", augment=False)
    assert train.class_ids.tolist() == [1, 50, 98] and test.class_ids.tolist() == [99, 196]
    assert [p.name for p in train.paths] == ["000001.jpg", "000002.jpg", "000003.jpg", "000007.jpg"]
    assert train.labels.tolist() == [0, 0, 2, 1] and test.labels.tolist() == [0, 0, 1]
    assert train.classes[1] == "Make Model 50" and test.classes == ["Make Model 99", "Make Model 196"]
    assert test[0][0].shape == (3, 8, 8) and torch.equal(test[0][0], test[0][0])


def test_cars_csv_conversion_and_missing_annotations(tmp_path):
    root = tmp_path / "cars"
    _cars_images(root)
    with pytest.raises(DataError, match=r"cars_annos\.mat.*path,class.*stanford\.edu"):
        data.build("cars196", root=str(root))
    (root / "cars_annos.csv").write_text("path,class\n" + "".join(f"car_ims/{n:06d}.jpg,{c}\n" for n, c in CARS))
    test = _quiet("cars196", root=str(root), split="test")
    assert test.class_ids.tolist() == [99, 196] and len(test) == 3
    (root / "other.csv").write_text("file,label\ncar_ims/000001.jpg,1\n")
    with pytest.raises(DataError, match="path,class"):
        data.build("cars196", root=str(root), annotations="other.csv")
    with pytest.raises(DataError, match="missing"):
        data.build("cars196", root=str(root), annotations="absent.mat")


def test_cars_classification_distribution_is_merged(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    root = tmp_path / "stanford_cars"
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    parts = {"train": [(1, 1), (2, 99)], "test": [(1, 98), (2, 196), (3, 99)]}  # (file number, class)
    (root / "devkit").mkdir(parents=True)
    for part, rows in parts.items():
        ann = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
        for i, (n, cls) in enumerate(rows):
            _jpg(root / f"cars_{part}" / f"{n:05d}.jpg")
            ann[0, i] = (*[np.array([[v]], dtype=np.uint8) for v in (1, 1, 5, 5, cls)], np.array([f"{n:05d}.jpg"]))
        target = root / "devkit" / "cars_train_annos.mat" if part == "train" else root / "cars_test_annos_withlabels.mat"
        scipy_io.savemat(target, {"annotations": ann})
    names = np.empty((1, 196), dtype=object)
    names[0, :] = [f"Car {c}" for c in range(1, 197)]
    scipy_io.savemat(root / "devkit" / "cars_meta.mat", {"class_names": names})
    train = _quiet("cars196", root=str(tmp_path), split="train")
    test = _quiet("cars196", root=str(root), split="test")
    assert [str(p.relative_to(root)) for p in train.paths] == ["cars_train/00001.jpg", "cars_test/00001.jpg"]
    assert train.class_ids.tolist() == [1, 98] and train.classes == ["Car 1", "Car 98"]
    assert test.class_ids.tolist() == [99, 196] and len(test) == 3 and test.labels.tolist() == [0, 1, 0]
    (root / "cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(DataError, match="ship separately"):
        data.build("cars196", root=str(root))


def test_cars_images_not_unpacked(cars_root):
    for p in (cars_root / "car_ims").iterdir():
        p.unlink()
    with pytest.raises(DataError, match="unpacked"):
        data.build("cars196", root=str(cars_root))


# --- Stanford Online Products -----------------------------------------------------------------------

def test_sop_labels_and_super_classes(sop_root):
    train = _quiet("sop", root=str(sop_root), split="train")
    test = _quiet("sop", root=str(sop_root.parent), split="test")
    assert train.class_ids.tolist() == [1, 2, 3] and train.labels.tolist() == [0, 0, 1, 2, 2]
    assert test.class_ids.tolist() == [11319, 11320, 11321] and test.labels.tolist() == [0, 0, 1, 2]
    assert train.super_labels.tolist() == [0, 0, 0, 1, 1] and train.super_classes == ["bicycle", "cabinet"]
    assert test.super_labels.tolist() == [0, 0, 1, 1] and test.super_classes == ["chair", "toaster"]
    assert test.super_class_ids.tolist() == [3, 12] and train.paths[0].suffix == ".JPG"
    assert train[4][0].shape == (3, 8, 8)
    with pytest.warns(CountMismatchWarning, match=r"official: 60,502"):
        data.build("sop", root=str(sop_root), split="test", **SIZE)


def test_sop_rearranged_roth_layout(sop_root, tmp_path):
    import shutil

    roth = tmp_path / "roth" / "online_products"
    shutil.copytree(sop_root, roth / "images")
    (roth / "Info_Files").mkdir()
    for name in ("Ebay_train.txt", "Ebay_test.txt"):
        shutil.move(roth / "images" / name, roth / "Info_Files" / name)
    test = _quiet("sop", root=str(roth.parent), split="test")
    assert test.class_ids.tolist() == [11319, 11320, 11321] and test.super_classes == ["chair", "toaster"]
    assert all(p.is_file() and p.parent.parent.name == "images" for p in test.paths)


def test_sop_missing_or_malformed_index(sop_root):
    (sop_root / "Ebay_test.txt").unlink()
    with pytest.raises(DataError, match=r"Ebay_test\.txt.*cvgl\.stanford\.edu"):
        data.build("sop", root=str(sop_root), split="test")
    (sop_root / "Ebay_train.txt").write_text("1 1 1 bicycle_final/111085122871_0.JPG\n")
    with pytest.raises(DataError, match="header"):
        data.build("sop", root=str(sop_root), split="train")


# --- In-Shop ----------------------------------------------------------------------------------------

def test_inshop_query_gallery_share_item_labels(tmp_path):
    root = _inshop(tmp_path / "InShop")
    train = _quiet("inshop", root=str(root), split="train")
    query = _quiet("inshop", root=str(tmp_path), split="query")
    gallery = _quiet("inshop", root=str(root), split="gallery")
    assert train.class_ids.tolist() == ["id_00000001", "id_00000003"] and train.labels.tolist() == [0, 0, 1]
    assert query.class_ids.tolist() == gallery.class_ids.tolist() == ["id_00000002", "id_00000005", "id_00000007"]
    assert query.labels.tolist() == [0, 2] and gallery.labels.tolist() == [0, 0, 2, 1]
    assert set(query.labels) <= set(gallery.labels) and query.classes[0] == "id_00000002"
    assert len(train) + len(query) + len(gallery) == len(INSHOP)
    assert not query.transform.transforms[0].__class__.__name__.startswith("Random")  # test transform
    assert gallery[3][0].shape == (3, 8, 8)
    with pytest.raises(DataError, match="valid splits"):
        data.build("inshop", root=str(root), split="test")


def test_inshop_highres_folder_and_missing_files(tmp_path):
    root = _inshop(tmp_path / "hr", img="img_highres")
    gallery = _quiet("inshop", root=str(root), split="gallery")
    assert all("img_highres" in str(p) for p in gallery.paths) and len(gallery) == 4
    (root / "Eval" / "list_eval_partition.txt").unlink()
    with pytest.raises(DataError, match=r"list_eval_partition\.txt.*DeepFashion"):
        data.build("inshop", root=str(root))
    other = _inshop(tmp_path / "noimg")
    import shutil

    shutil.rmtree(other / "img")
    with pytest.raises(DataError, match=r"missing .*img"):
        data.build("inshop", root=str(other))


# --- image pipelines --------------------------------------------------------------------------------

@pytest.mark.parametrize("pipeline,size", [("default", 224), ("reality_check", 227), ("iaa", 224), ("iaa_cub", 224)])
def test_pipeline_output_shapes(pipeline, size):
    img = Image.new("RGB", (300, 200), (255, 128, 0))
    for train in (True, False):
        x = build_transform(train, pipeline=pipeline)(img)
        assert x.shape == (3, size, size)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    expected = (torch.tensor([1.0, 128 / 255, 0.0])[:, None, None] - mean) / std
    assert torch.allclose(x, expected.expand_as(x), atol=0.02)  # imagenet normalisation, RGB order


def test_bninception_normalisation_is_bgr_0_255_mean_subtracted():
    img = Image.new("RGB", (40, 30), (255, 128, 0))
    x = build_transform(False, normalization="bninception", size=16)(img)
    assert x.shape == (3, 16, 16)
    assert torch.allclose(x[:, 0, 0], torch.tensor([0.0 - 104, 128.0 - 117, 255.0 - 128]), atol=1.0)
    assert normalization_for("bninception") == "bninception" and normalization_for("resnet50") == "imagenet"
    with pytest.raises(ConfigError, match="Did you mean 'imagenet'"):
        build_transform(True, normalization="imagenett")
    with pytest.raises(ConfigError, match="reality_check"):
        build_transform(True, pipeline="reality")
    assert image_transform(False, size=8)(img).shape == (3, 8, 8)  # the folder loader's transform still works


def test_loaders_take_the_trainer_keywords():
    for key in ("cub200", "cars196", "sop", "inshop"):
        params = data.DATASETS.parameters(key)
        assert {"root", "split", "augment", "image_size", "pipeline", "normalization"} <= set(params)


# --- one epoch through the CLI on the fixtures -------------------------------------------------------

CLI_FAST = ["train.epochs=1", "train.iterations_per_epoch=2", "eval.tsne=false", "eval.ks=[1]",
            "model.backbone=small_cnn", "model.backbone_kwargs={in_channels: 3, input_size: 8}",
            "model.embedding_size=8", "model.pretrained=false", "data.kwargs={image_size: 8}", "data.num_workers=0",
            "train.amp=false", "device=cpu"]


@pytest.mark.filterwarnings("ignore::deepmetric.data.benchmarks.CountMismatchWarning")
@pytest.mark.parametrize("key", ["cub200", "inshop"])
def test_one_epoch_through_the_cli(key, cub_root, tmp_path):
    from typer.testing import CliRunner

    from deepmetric.cli import app

    root = cub_root if key == "cub200" else _inshop(tmp_path / "InShop")
    sampler = ["sampler.batch_size=4", "sampler.m=2"] if key == "cub200" else ["sampler.batch_size=2", "sampler.m=1"]
    sets = [f"data.name={key}", f"data.root={root}", *CLI_FAST, *sampler]
    if key == "inshop":
        sets += ["data.query_split=query", "data.gallery_split=gallery"]
    args = ["train", "--out", str(tmp_path / "run"), "--no-progress"]
    for s in sets:
        args += ["--set", s]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "recall@1" in result.output


# --- options: bounding-box crops, truncated files --------------------------------------------------------

def test_crop_boxes_option(cub_root, cars_root, sop_root, tmp_path):
    keep = dict(transform=lambda img: img)  # look at the PIL image itself
    cub = _quiet("cub200", root=str(cub_root), split="train", crop_boxes=True, **keep)
    assert cub[0][0].size == (5, 5)  # bounding_boxes.txt: x 1, y 1, width 5, height 5
    assert _quiet("cub200", root=str(cub_root), split="train", **keep)[0][0].size == (12, 10)  # off by default
    cars = _quiet("cars196", root=str(cars_root), split="test", crop_boxes=True, **keep)
    assert cars[0][0].size == (8, 6)  # bbox_x1 1, bbox_y1 2, bbox_x2 9, bbox_y2 8
    shop = _quiet("inshop", root=str(_inshop(tmp_path / "InShop")), split="query", crop_boxes=True, **keep)
    assert shop[0][0].size == (7, 5)  # clothes_type 1, pose_type 1, x_1 2, y_1 3, x_2 9, y_2 8
    with pytest.raises(DataError, match="no bounding box"):
        _quiet("sop", root=str(sop_root), crop_boxes=True)
    (cub_root / "bounding_boxes.txt").unlink()
    with pytest.raises(DataError, match=r"bounding_boxes\.txt"):
        _quiet("cub200", root=str(cub_root), crop_boxes=True)


def test_truncated_image_behind_a_flag(cub_root):
    from deepmetric.data.images import truncated_files

    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    victim = sorted((cub_root / "images" / "001.Black_footed_Albatross").iterdir())[0]
    Image.fromarray(noise).save(victim, format="JPEG", quality=95)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size * 2 // 3])
    strict = _quiet("cub200", root=str(cub_root), split="train", allow_truncated=False)
    with pytest.raises(DataError, match="allow_truncated"):
        strict[0]
    lenient = _quiet("cub200", root=str(cub_root), split="train")
    with pytest.warns(UserWarning, match="truncated"):
        x, _ = lenient[0]
    assert x.shape == (3, 8, 8) and str(victim) in truncated_files()
