"""Tests for cityseg.synthetic: Cityscapes layout, official label rendering, consistency, determinism, CLI."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cityscapesscripts.helpers.annotation import Annotation
from cityscapesscripts.helpers.labels import labels as CS_LABELS
from cityscapesscripts.helpers.labels import name2label
from cityscapesscripts.preparation.json2labelImg import createLabelImage

from cityseg.synthetic import parse_size, write_tree

REPO = Path(__file__).resolve().parents[1]
SIZE = (128, 256)
IMG_RE = re.compile(r"^(?P<city>[a-z]+)_(?P<seq>\d{6})_(?P<frame>\d{6})_leftImg8bit\.png$")
GT_SUFFIXES = ("_gtFine_polygons.json", "_gtFine_labelIds.png", "_gtFine_labelTrainIds.png", "_gtFine_color.png")
REAL_CITIES = {
    "train": {"aachen", "bochum", "bremen", "cologne", "darmstadt", "dusseldorf", "erfurt", "hamburg",
              "hanover", "jena", "krefeld", "monchengladbach", "strasbourg", "stuttgart", "tubingen", "ulm",
              "weimar", "zurich"},
    "val": {"frankfurt", "lindau", "munster"},
    "test": {"berlin", "bielefeld", "bonn", "leverkusen", "mainz", "munich"},
}
VOID_IDS = {lab.id for lab in CS_LABELS if lab.category == "void" and lab.id >= 0}


def _id_to_train_lut() -> np.ndarray:
    lut = np.full(256, -1, np.int32)
    for lab in CS_LABELS:
        if lab.id >= 0:
            lut[lab.id] = lab.trainId
    return lut


def _id_to_colour_lut() -> np.ndarray:
    lut = np.zeros((256, 3), np.uint8)
    for lab in CS_LABELS:
        if lab.id >= 0:
            lut[lab.id] = lab.color
    return lut


def _images(root: Path, img_rel: str = "leftImg8bit") -> list[Path]:
    return sorted((root / img_rel).glob("*/*/*_leftImg8bit.png"))


def _gt(img: Path, suffix: str) -> Path:
    """The gtFine sibling of a downloads-layout image: ROOT/gtFine/SPLIT/CITY/STEM+suffix."""
    root, split, city = img.parents[3], img.parts[-3], img.parts[-2]
    return root / "gtFine" / split / city / (img.name[: -len("_leftImg8bit.png")] + suffix)


def _read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 train + 8 val + 2 test images at 128x256, seed 0."""
    root = write_tree(tmp_path_factory.mktemp("syn") / "cs", 12, 8, 2, size=SIZE, seed=0)
    return root


def test_layout_names_and_siblings(tree: Path) -> None:
    assert (tree / "leftImg8bit").is_dir() and (tree / "gtFine").is_dir()
    imgs = _images(tree)
    per_split: dict[str, set[str]] = {}
    counts: dict[str, int] = {}
    for img in imgs:
        split, city = img.parts[-3], img.parts[-2]
        m = IMG_RE.match(img.name)
        assert m, img.name
        assert m["city"] == city and city in REAL_CITIES[split]
        per_split.setdefault(split, set()).add(city)
        counts[split] = counts.get(split, 0) + 1
        for suffix in GT_SUFFIXES:
            assert _gt(img, suffix).is_file(), (img, suffix)
    assert counts == {"train": 12, "val": 8, "test": 2}
    assert all(len(cities) == 2 for cities in per_split.values()), per_split
    n_gt = len(list((tree / "gtFine").glob("*/*/*")))
    assert n_gt == 4 * len(imgs)


def test_trainvaltest_layout(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "tvt", 2, 1, 1, size=(64, 128), seed=1, layout="trainvaltest")
    assert root == tmp_path / "tvt"
    assert not (root / "leftImg8bit").exists()
    imgs = sorted((root / "leftImg8bit_trainvaltest" / "leftImg8bit").glob("*/*/*_leftImg8bit.png"))
    assert [p.parts[-3] for p in imgs].count("train") == 2 and len(imgs) == 4
    for img in imgs:
        gt_dir = root / "gtFine_trainvaltest" / "gtFine" / img.parts[-3] / img.parts[-2]
        stem = img.name[: -len("_leftImg8bit.png")]
        assert all((gt_dir / f"{stem}{s}").is_file() for s in GT_SUFFIXES)
    with pytest.raises(ValueError):
        write_tree(tmp_path / "bad", 1, 0, layout="nope")


def test_label_images_follow_cityscapes_tables(tree: Path) -> None:
    train_lut, colour_lut = _id_to_train_lut(), _id_to_colour_lut()
    for img in _images(tree):
        ids = _read(_gt(img, "_gtFine_labelIds.png"))
        train = _read(_gt(img, "_gtFine_labelTrainIds.png"))
        colour = _read(_gt(img, "_gtFine_color.png"))
        rgb = _read(img)
        assert rgb.dtype == np.uint8 and rgb.shape == (*SIZE, 3)
        assert ids.dtype == np.uint8 and ids.shape == SIZE and train.shape == SIZE
        assert (train_lut[ids] >= 0).all(), "labelIds holds an id missing from the Cityscapes table"
        np.testing.assert_array_equal(train, train_lut[ids])
        np.testing.assert_array_equal(colour[..., :3], colour_lut[ids])


def test_polygons_json_is_official_and_renders_to_label_ids(tree: Path) -> None:
    for img in _images(tree)[:8]:
        path = _gt(img, "_gtFine_polygons.json")
        data = json.loads(path.read_text())
        assert set(data) == {"imgHeight", "imgWidth", "objects"}
        assert (data["imgHeight"], data["imgWidth"]) == SIZE
        for obj in data["objects"]:
            assert obj["label"] in name2label
            pts = np.array(obj["polygon"])
            assert pts.ndim == 2 and pts.shape[0] >= 3 and pts.shape[1] == 2
            assert pts.dtype.kind == "i" and (pts >= 0).all()
            assert (pts[:, 0] < SIZE[1]).all() and (pts[:, 1] < SIZE[0]).all()
        ann = Annotation()
        ann.fromJsonFile(str(path))
        np.testing.assert_array_equal(np.asarray(createLabelImage(ann, "ids")),
                                      _read(_gt(img, "_gtFine_labelIds.png")))


def test_all_train_classes_and_void_regions_appear(tree: Path) -> None:
    seen_train: set[int] = set()
    seen_ids: set[int] = set()
    json_labels: set[str] = set()
    for img in _images(tree):
        if img.parts[-3] == "test":
            continue
        seen_train |= set(np.unique(_read(_gt(img, "_gtFine_labelTrainIds.png"))).tolist())
        seen_ids |= set(np.unique(_read(_gt(img, "_gtFine_labelIds.png"))).tolist())
        json_labels |= {o["label"] for o in json.loads(_gt(img, "_gtFine_polygons.json").read_text())["objects"]}
    assert set(range(19)) <= seen_train, sorted(set(range(19)) - seen_train)
    assert 255 in seen_train
    assert name2label["ego vehicle"].id in seen_ids
    assert "license plate" in json_labels
    assert {"static", "dynamic", "parking", "guard rail"} & json_labels


def test_image_agrees_with_labels(tree: Path) -> None:
    sky, road = name2label["sky"].id, name2label["road"].id
    for img in _images(tree):
        if img.parts[-3] == "test":
            continue
        rgb = _read(img).astype(np.float64)
        ids = _read(_gt(img, "_gtFine_labelIds.png"))
        rows = np.arange(SIZE[0])[:, None].repeat(SIZE[1], 1)
        assert rows[ids == sky].mean() < rows[ids == road].mean()
        assert rgb[ids == sky][:, 2].mean() > rgb[ids == road][:, 2].mean()
        # pixels of a class look alike: class means explain a good part of the colour variance
        within = sum(((rgb[ids == c] - rgb[ids == c].mean(0)) ** 2).sum() for c in np.unique(ids))
        total = ((rgb - rgb.reshape(-1, 3).mean(0)) ** 2).sum()
        assert within < 0.8 * total


def test_test_split_is_all_void(tree: Path) -> None:
    tests = [p for p in _images(tree) if p.parts[-3] == "test"]
    assert len(tests) == 2
    for img in tests:
        assert (_read(_gt(img, "_gtFine_labelTrainIds.png")) == 255).all()
        assert set(np.unique(_read(_gt(img, "_gtFine_labelIds.png"))).tolist()) <= VOID_IDS
        objs = json.loads(_gt(img, "_gtFine_polygons.json").read_text())["objects"]
        assert all(name2label[o["label"]].category == "void" for o in objs)
        assert _read(img).std() > 10  # the image itself is still a street scene


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_per_seed(tmp_path: Path) -> None:
    a = _tree_bytes(write_tree(tmp_path / "a", 2, 1, 1, size=(64, 128), seed=7))
    b = _tree_bytes(write_tree(tmp_path / "b", 2, 1, 1, size=(64, 128), seed=7))
    c = _tree_bytes(write_tree(tmp_path / "c", 2, 1, 1, size=(64, 128), seed=8))
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if k.endswith("_leftImg8bit.png"))


@pytest.mark.parametrize("size", [(16, 16), (37, 91), (64, 128), (200, 90)])
def test_odd_and_small_sizes(tmp_path: Path, size: tuple[int, int]) -> None:
    root = write_tree(tmp_path, 3, 0, 0, size=size, seed=2)
    for img in _images(root):
        assert _read(img).shape == (*size, 3)
        assert _read(_gt(img, "_gtFine_labelIds.png")).shape == size


def test_parse_size() -> None:
    assert parse_size("64x128") == (64, 128)
    assert parse_size("1024X2048") == (1024, 2048)
    for bad in ("64", "64x", "x128", "axb", "64x128x3", "-64x128", "0x128", "8x8", ""):
        with pytest.raises((argparse.ArgumentTypeError, ValueError), match="x|at least"):
            parse_size(bad)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cityseg.synthetic", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_cli_writes_tree(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    proc = _cli("--out", str(out), "--num-train", "2", "--num-val", "1", "--num-test", "1",
                "--size", "64x128", "--seed", "3", "--layout", "trainvaltest")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and str(out) in lines[0]
    assert len(_images(out / "leftImg8bit_trainvaltest", "leftImg8bit")) == 4
    # the same seed through the API gives byte-identical files
    assert _tree_bytes(out) == _tree_bytes(write_tree(tmp_path / "api", 2, 1, 1, (64, 128), 3, "trainvaltest"))


@pytest.mark.parametrize("size", ["big", "64by128", "0x10"])
def test_cli_bad_size_is_one_clear_line(tmp_path: Path, size: str) -> None:
    proc = _cli("--out", str(tmp_path / "x"), "--size", size)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "--size" in err[0] and size in err[0]
    assert not (tmp_path / "x").exists()


def test_several_writer_processes_write_the_same_files(tmp_path):
    import hashlib

    def digest(root):
        return sorted((str(p.relative_to(root)), hashlib.sha256(p.read_bytes()).hexdigest())
                      for p in root.rglob("*") if p.is_file())

    one = write_tree(tmp_path / "one", num_train=3, num_val=2, num_test=1, size=(64, 128), seed=5)
    three = write_tree(tmp_path / "three", num_train=3, num_val=2, num_test=1, size=(64, 128), seed=5, workers=3)
    assert digest(one) == digest(three) and len(digest(one)) > 20
