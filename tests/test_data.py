"""Reading Cityscapes trees: layouts, label mapping, augmentation determinism, sampling and bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from cityscapesscripts.helpers.labels import labels as cs_labels

from cityseg.data import (CityscapesDataset, DataError, ShardSampler, TrainSampler, detect_layout, list_samples,
                          make_loader, read_image, read_label)
from cityseg.labels import ids_to_train_ids
from cityseg.synthetic import write_tree
from cityseg.transforms import TrainTransform
from conftest import TINY, run_script


@pytest.fixture
def tree(tmp_path) -> Path:
    """A fresh, modifiable tree per test."""
    return write_tree(tmp_path / "cs", num_train=4, num_val=3, num_test=0, size=(64, 128), seed=1)


def test_both_layouts_are_detected_and_read_the_same(tmp_path):
    plain = write_tree(tmp_path / "a", 3, 2, 0, size=(64, 128), seed=3, layout="downloads")
    wrapped = write_tree(tmp_path / "b", 3, 2, 0, size=(64, 128), seed=3, layout="trainvaltest")
    assert detect_layout(plain)[0] == plain / "leftImg8bit"
    assert detect_layout(wrapped)[0] == wrapped / "leftImg8bit_trainvaltest" / "leftImg8bit"
    a, b = CityscapesDataset(plain, "val"), CityscapesDataset(wrapped, "val")
    assert [s.name for s in a.samples] == [s.name for s in b.samples]
    for i in range(len(a)):
        assert all(torch.equal(u, v) for u, v in zip(a[i][:2], b[i][:2]))


def test_label_ids_map_to_train_ids_like_the_official_renderer(synthetic_root):
    # The synthetic tree holds *_labelTrainIds.png drawn by cityscapesscripts' json2labelImg: an independent
    # rendering of the same polygons. Mapping labelIds through our table must give exactly that image.
    samples = list_samples(synthetic_root, "train")
    assert all(s.label.name.endswith("_gtFine_labelIds.png") for s in samples)
    ids, train_ids = set(), set()
    for s in samples:
        official = cv2.imread(str(s.label).replace("_labelIds.png", "_labelTrainIds.png"), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(read_label(s.label), official)
        ids |= set(np.unique(cv2.imread(str(s.label), cv2.IMREAD_UNCHANGED)).tolist())
        train_ids |= set(np.unique(official).tolist())
    # and the files exercise the mapping: void ids (to 255) and most of the 19 classes
    assert ids & {lab.id for lab in cs_labels if lab.trainId == 255 and lab.id >= 0}
    assert 255 in train_ids and len(train_ids - {255}) >= 15


def _png_forms(rgb: np.ndarray, tmp: Path) -> dict[str, Path]:
    """The same picture as PNGs of every colour type and depth, and as a JPEG."""
    from PIL import Image

    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    forms = {"rgb8": bgr, "grey": cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY),
             "rgba": cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA), "rgb16": bgr.astype(np.uint16) * 257}
    paths = {}
    for name, arr in forms.items():
        paths[name] = tmp / f"{name}.png"
        assert cv2.imwrite(str(paths[name]), arr)
    paths["palette"] = tmp / "palette.png"
    Image.fromarray(rgb).quantize(16).save(paths["palette"])
    paths["jpeg"] = tmp / "x.jpg"
    assert cv2.imwrite(str(paths["jpeg"]), bgr)
    return paths


def test_images_decode_like_opencv_in_every_form(synthetic_root, tmp_path):
    # Cityscapes PNGs take the libspng path, other forms OpenCV's; both must give what OpenCV reads, in RGB.
    rgb = cv2.cvtColor(cv2.imread(str(list_samples(synthetic_root, "val")[0].image)), cv2.COLOR_BGR2RGB)
    for name, path in _png_forms(rgb, tmp_path).items():
        expected = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        got = read_image(path)
        assert got.dtype == np.uint8 and got.shape == rgb.shape, name
        assert np.array_equal(got, expected), name
    for s in list_samples(synthetic_root, "train"):
        official = cv2.imread(str(s.label), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(read_label(s.label), ids_to_train_ids(official))


def test_precomputed_train_ids_give_the_same_samples(tree):
    before = CityscapesDataset(tree, "val")
    ref = [before[i][1] for i in range(len(before))]
    for p in (tree / "gtFine" / "val").glob("*/*_gtFine_labelIds.png"):
        p.unlink()
    after = CityscapesDataset(tree, "val")
    assert all(s.label.name.endswith("_labelTrainIds.png") for s in after.samples)
    assert all(torch.equal(after[i][1], ref[i]) for i in range(len(after)))


def test_augmentation_depends_only_on_seed_epoch_index(synthetic_root):
    t = TrainTransform((64, 128), seed=7)
    a = CityscapesDataset(synthetic_root, "train", t)
    b = CityscapesDataset(synthetic_root, "train", TrainTransform((64, 128), seed=7))
    x1 = a[(2, 5)]
    for _ in range(3):
        a[(0, 1)]  # history must not matter
    x2, x3 = a[(2, 5)], b[(2, 5)]
    assert torch.equal(x1[0], x2[0]) and torch.equal(x1[1], x3[1]) and torch.equal(x1[0], x3[0])
    assert x1[0].shape == (64, 128, 3) and x1[0].dtype == torch.uint8 and x1[1].dtype == torch.uint8
    assert not torch.equal(a[(3, 5)][0], x1[0])  # another epoch, another augmentation


def test_loader_batches_do_not_depend_on_workers(synthetic_root):
    ds = CityscapesDataset(synthetic_root, "train", TrainTransform((64, 128), seed=0))

    def batches(workers):
        sampler = TrainSampler(len(ds), 2, 1, 0, seed=0)
        sampler.set_epoch(1)
        return [b[0] for b in make_loader(ds, sampler, 2, workers, pin=False, drop_last=True)]

    zero, two = batches(0), batches(2)
    assert len(zero) == len(two) == 4  # 8 images in batches of 2
    assert all(torch.equal(u, v) for u, v in zip(zero, two))


def test_train_sampler_walks_one_global_order_for_any_world_size():
    n, seed = 23, 5
    one = TrainSampler(n, 6, 1, 0, seed)
    two = [TrainSampler(n, 3, 2, r, seed) for r in range(2)]
    three = [TrainSampler(n, 2, 3, r, seed) for r in range(3)]
    for epoch in (0, 4):
        for s in [one, *two, *three]:
            s.set_epoch(epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        expected = [perm[k * 6:(k + 1) * 6] for k in range(n // 6)]  # global batches, remainder dropped
        for group, b in ((two, 3), (three, 2)):
            streams = [[i for _, i in s] for s in group]
            got = [sum((st[k * b:(k + 1) * b] for st in streams), []) for k in range(n // 6)]
            assert got == expected
        assert [i for _, i in one] == sum(expected, [])
        assert {e for e, _ in one} == {epoch}


def test_train_sampler_starts_mid_epoch_without_replaying():
    s = TrainSampler(20, 2, 2, 1, seed=0)
    s.set_epoch(3)
    full = list(s)
    s.set_epoch(3, start_step=2)
    assert list(s) == full[2 * 2:] and len(s) == len(full) - 4


def test_too_few_images_for_one_global_batch():
    with pytest.raises(DataError, match="fewer than one global batch"):
        TrainSampler(5, 4, 2, 0)


@pytest.mark.quick
def test_eval_sharding_covers_every_image_exactly_once():
    for n in (5, 6, 1):
        for world in (1, 2, 3, 4):
            shards = [list(ShardSampler(n, world, r)) for r in range(world)]
            assert sorted(sum(shards, [])) == list(range(n))


# ---------------------------------------------------------------------------------------------- bad input
def _img(tree, split="val", i=0):
    return sorted((tree / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))[i]


def _lab(tree, split="val", i=0):
    return sorted((tree / "gtFine" / split).glob("*/*_gtFine_labelIds.png"))[i]


def _break_missing_label(tree):
    lab = _lab(tree)
    lab.unlink()
    lab.with_name(lab.name.replace("labelIds", "labelTrainIds")).unlink()
    return lab.name.replace("_gtFine_labelIds.png", "_leftImg8bit.png"), "no label file"


def _break_missing_image(tree):
    img = _img(tree)
    img.unlink()
    return img.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png"), "label without its image"


def _break_truncated(tree):
    img = _img(tree)
    img.write_bytes(img.read_bytes()[:200])
    return img.name, "truncated or corrupt"


def _break_empty(tree):
    img = _img(tree)
    img.write_bytes(b"")  # what an interrupted copy or a full disk leaves
    return img.name, "empty file (0 bytes)"


def _break_size(tree):
    lab = _lab(tree)
    cv2.imwrite(str(lab), np.full((32, 64), 7, np.uint8))
    return lab.name, "must match"


def _break_ids(tree):
    lab = _lab(tree)
    arr = cv2.imread(str(lab), cv2.IMREAD_UNCHANGED)
    arr[0, :3] = 77
    cv2.imwrite(str(lab), arr)
    return lab.name, "label ids [77] are not in the Cityscapes label table"


def _break_train_ids(tree):
    lab = _lab(tree)
    train = lab.with_name(lab.name.replace("labelIds", "labelTrainIds"))
    arr = cv2.imread(str(train), cv2.IMREAD_UNCHANGED)
    arr[5, 5], arr[-1, -1] = 19, 200
    cv2.imwrite(str(train), arr)
    lab.unlink()
    return train.name, "trainIds [19, 200] are not Cityscapes train ids"


def _break_root(tree):
    shutil.rmtree(tree)
    return str(tree), "no such directory"


def _break_layout(tree):
    (tree / "leftImg8bit").rename(tree / "images")
    return str(tree), "holds neither leftImg8bit/"


BREAKS = [_break_missing_label, _break_missing_image, _break_truncated, _break_empty, _break_size, _break_ids, _break_train_ids,
          _break_root, _break_layout]


@pytest.mark.quick
@pytest.mark.parametrize("breaker", BREAKS, ids=lambda f: f.__name__[7:])
def test_bad_input_is_one_clear_error(tree, breaker):
    path, message = breaker(tree)
    with pytest.raises(DataError) as e:
        ds = CityscapesDataset(tree, "val")
        for i in range(len(ds)):
            ds[i]
    assert path in str(e.value) and message in str(e.value)


@pytest.mark.parametrize("breaker", [_break_truncated, _break_ids, _break_missing_label], ids=["png", "ids", "pair"])
def test_evaluate_reports_bad_input_in_one_line(tree, tmp_path, breaker):
    # The error raised inside a DataLoader worker must still reach the user as one line, no traceback.
    run_script("train.py", ["--data-root", str(tree), "--out-dir", str(tmp_path / "run"), "--max-iters", "1",
                            "--batch-size", "2", *TINY])
    path, message = breaker(tree)
    proc = run_script("evaluate.py", ["--checkpoint", str(tmp_path / "run" / "last.pt"), "--data-root", str(tree),
                                      "--workers", "1", "--device", "cpu"], check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("error: ") and path in err[-1] and message in err[-1]
    assert "Traceback" not in proc.stderr


def test_loader_workers_keep_serving_after_the_stop_signals(synthetic_root):
    # SLURM and terminals signal every process of a job. The workers must keep loading (SIGTERM only starts
    # their grace timer) until the training process has finished its step and shuts them down: signal them,
    # then read two epochs, more than they had prefetched, from the same (persistent) workers.
    import os
    import signal
    import time

    ds = CityscapesDataset(synthetic_root, "train", TrainTransform((64, 128), seed=0))

    def epochs(workers):
        sampler = TrainSampler(len(ds), 1, 1, 0, seed=0)
        loader = make_loader(ds, sampler, 1, workers, pin=False, drop_last=True)
        sampler.set_epoch(0)
        it = iter(loader)
        got = [next(it)[0], next(it)[0]]  # a batch from each worker: both have set up their signal handling
        if workers:
            for pid in [w.pid for w in it._workers]:
                for sig in (signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
                    os.kill(pid, sig)
            time.sleep(0.5)  # let the signals land
        got += [b[0] for b in it]
        sampler.set_epoch(1)
        return got + [b[0] for b in loader]

    expected, got = epochs(0), epochs(2)
    assert len(got) == len(expected) == 16
    assert all(torch.equal(u, v) for u, v in zip(got, expected))
