"""Nothing lost to the data (issue 17): augmentation draws that do not depend on who loads a sample, bad
images and annotation entries that are dropped and listed instead of stopping a run, unreadable samples
replaced (train) or blanked (val) with the news in the target, and unknown class names listed all at once."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from accel_det.config import RecipeError
from accel_det.config_io import load_recipe
from accel_det.data import (
    PROBLEM_KINDS,
    COCODetection,
    DetectionDataset,
    VOCDetection,
    YOLODetection,
    build_dataset,
    build_transforms,
    collate_fn,
    worker_init,
)
from accel_det.errors import DataError

CLASSES = ["circle", "square", "triangle"]
AUGMENTS = ["photometric", "zoom_out", "iou_crop", "hflip"]


def _image(path: Path, w: int = 40, h: int = 30, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header still reads: only a full decode finds it
    return path


def _xml(path: Path, objects: list[tuple[str, tuple[float, float, float, float]]], size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [f"<annotation><size><width>{size[0]}</width><height>{size[1]}</height></size>"]
    for name, (x1, y1, x2, y2) in objects:
        parts.append(
            f"<object><name>{name}</name><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax>"
            f"<ymax>{y2}</ymax></bndbox></object>"
        )
    path.write_text("".join(parts) + "</annotation>")
    return path


def _good_voc(root: Path, n: int) -> list[str]:
    ids = []
    for i in range(n):
        ids.append(f"ok{i}")
        _image(root / f"JPEGImages/ok{i}.png", 40, 30, seed=i)
        _xml(root / f"Annotations/ok{i}.xml", [(CLASSES[i % 3], (3 + i, 4, 20 + i, 25)), ("square", (22, 2, 38, 14))])
    return ids


def _kinds(ds: DetectionDataset) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for p in ds.problems:
        assert p.kind in PROBLEM_KINDS and "\n" not in p.detail
        out.setdefault(p.kind, []).append((Path(p.file).name, p.action))
    return out


def _iterate(ds: DetectionDataset, workers: int, batch_size: int = 2) -> list[dict]:
    """Every target of one pass over ``ds`` in order, images attached under "image"."""
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate_fn,
                        worker_init_fn=worker_init)  # fmt: skip
    out = []
    for images, targets in loader:
        for image, target in zip(images, targets):
            out.append({**target, "image": image})
    return out


def _check_replaced(ds: DetectionDataset, bad: Path) -> None:
    """A pass with 0 and with 2 workers: every sample arrives, the bad one's stand-in says so, and both
    passes are the same bit for bit."""
    passes = [_iterate(ds, workers) for workers in (0, 2)]
    for targets in passes:
        assert len(targets) == len(ds)
        replaced = [t["replaced"] for t in targets if "replaced" in t]
        assert len(replaced) == 1 and len(replaced[0]) == 1
        assert replaced[0][0].startswith(f"{bad}: cannot read image: ") and "\n" not in replaced[0][0]
    for a, b in zip(*passes):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["boxes"], b["boxes"])
        assert a.get("replaced") == b.get("replaced")


# 1. augmentation draws: a function of (seed, epoch, index) only -------------------------------------------------


def test_draws_do_not_depend_on_workers_order_or_batches(tmp_path: Path) -> None:
    root = tmp_path / "voc"
    _good_voc(root, 10)
    ds = VOCDetection(root, "", CLASSES, build_transforms(True, 32, AUGMENTS), keep_difficult=False, seed=3)

    def reference(epoch: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        ds.set_epoch(epoch)
        return {i: (ds[i][0].as_subclass(torch.Tensor), ds[i][1]["boxes"].as_subclass(torch.Tensor))
                for i in range(len(ds))}  # fmt: skip

    refs = {epoch: reference(epoch) for epoch in (0, 1)}
    assert any(not torch.equal(refs[0][i][0], refs[1][i][0]) for i in range(len(ds)))

    def check(loader: DataLoader, epoch: int) -> None:
        seen = set()
        for images, targets in loader:
            for image, target in zip(images, targets):
                i = int(target["image_id"])  # VOC: the index in the split
                assert torch.equal(image, refs[epoch][i][0]), (epoch, i)
                assert torch.equal(target["boxes"], refs[epoch][i][1]), (epoch, i)
                seen.add(i)
        assert seen == set(range(len(ds)))

    gen = torch.Generator().manual_seed(0)
    loaders = [
        DataLoader(ds, batch_size=3, num_workers=0, collate_fn=collate_fn),
        DataLoader(ds, batch_size=4, shuffle=True, generator=gen, num_workers=1, collate_fn=collate_fn,
                   worker_init_fn=worker_init),
        # persistent workers started in epoch 0 must see set_epoch(1) too
        DataLoader(ds, batch_size=5, sampler=list(reversed(range(len(ds)))), num_workers=2, collate_fn=collate_fn,
                   persistent_workers=True, worker_init_fn=worker_init),
    ]  # fmt: skip
    for epoch in (0, 1, 0):
        ds.set_epoch(epoch)
        for loader in loaders:
            check(loader, epoch)
        torch.rand(5)  # the caller's RNG moving between epochs changes nothing


def test_workers_ignore_sigint_and_sigterm() -> None:
    loader = DataLoader(_Signals(), batch_size=1, num_workers=2, worker_init_fn=worker_init, persistent_workers=True)
    it = iter(loader)
    # one batch from each worker (they take turns): both have run worker_init, so the signals cannot land before
    # it on a loaded machine (they would kill a worker still starting, which is not what the test is about)
    first = [next(it), next(it)]
    for worker in it._workers:  # what Ctrl-C or SLURM's scancel send to the whole process group
        os.kill(worker.pid, signal.SIGINT)
        os.kill(worker.pid, signal.SIGTERM)
    time.sleep(0.5)
    batches = [*first, *it]  # a killed worker would raise "DataLoader worker (pid ...) exited unexpectedly"
    assert sorted(int(b[0]) for b in batches) == list(range(len(_Signals())))
    assert {(int(b[1]), int(b[2])) for b in batches} == {(int(signal.SIG_IGN), int(signal.SIG_IGN))}
    del it


class _Signals(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> tuple[int, int, int]:
        time.sleep(0.02)
        return i, int(signal.getsignal(signal.SIGINT)), int(signal.getsignal(signal.SIGTERM))


# 2. per-format folders with one of each per-image problem -----------------------------------------------------


def _bad_voc(root: Path) -> tuple[list[str], Path]:
    ids = _good_voc(root, 3)
    _xml(root / "Annotations/missing.xml", [("circle", (2, 2, 10, 10))])  # no image
    _image(root / "JPEGImages/malformed.png")
    (root / "Annotations/malformed.xml").write_text("<annotation><object>")
    _image(root / "JPEGImages/noxml.png")  # listed, no XML
    _image(root / "JPEGImages/inverted.png")
    _xml(root / "Annotations/inverted.xml", [("circle", (2, 2, 10, 10)), ("square", (20, 2, 10, 10))])
    _image(root / "JPEGImages/outside.png")
    _xml(root / "Annotations/outside.xml", [("circle", (2, 2, 10, 10)), ("circle", (50, 40, 60, 50))])
    _image(root / "JPEGImages/ignored.png")
    _xml(root / "Annotations/ignored.xml", [("dog", (2, 2, 10, 10)), ("triangle", (5, 5, 20, 20))])
    bad = _truncate(_image(root / "JPEGImages/truncated.png", seed=9))
    _xml(root / "Annotations/truncated.xml", [("circle", (2, 2, 10, 10))])
    ids = ["missing", *ids[:2], "malformed", "noxml", "inverted", "outside", "ignored", "truncated", ids[2]]
    (root / "split.txt").write_text("\n".join(ids) + "\n")
    return ids, bad


def test_voc_bad_entries_are_dropped_and_listed(tmp_path: Path) -> None:
    root = tmp_path / "voc"
    _, bad = _bad_voc(root)
    tf = build_transforms(True, 32, AUGMENTS)
    ds = VOCDetection(root, "split.txt", CLASSES, tf, on_bad_sample="skip", ignore_classes=["dog"])
    assert _kinds(ds) == {
        "missing_image": [("missing.xml", "image dropped")],
        "malformed_annotation": [("malformed.xml", "image dropped")],
        "missing_annotation": [("noxml.xml", "image dropped")],
        "invalid_box": [("inverted.xml", "object dropped")],
        "box_outside": [("outside.xml", "object dropped")],
        "ignored_class": [("ignored.xml", "object dropped")],
    }
    assert [ds.image_path(i).stem for i in range(len(ds))] == [
        "ok0", "ok1", "inverted", "outside", "ignored", "truncated", "ok2"
    ]  # fmt: skip
    assert ds.num_objects() == 2 * 3 + 1 + 1 + 1 + 1
    inverted = next(p for p in ds.problems if p.kind == "invalid_box")
    assert inverted.detail == "object 2: box x1=20 y1=2 x2=10 y2=10 has x2 < x1 or y2 < y1"
    assert len(ds.warnings) == 6 and all("\n" not in w and str(root / "split.txt") in w for w in ds.warnings)
    assert any("1 x image file missing (image dropped): " in w and "missing.xml" in w for w in ds.warnings)
    _check_replaced(ds, bad)

    # "error": the first problem stops the run, as it always did
    with pytest.raises(DataError) as info:
        VOCDetection(root, "split.txt", CLASSES, tf, ignore_classes=["dog"])
    assert str(info.value).startswith(f"{root / 'Annotations/missing.xml'}: image file missing (tried ")
    (root / "split.txt").write_text("ok0\ntruncated\n")
    strict = VOCDetection(root, "split.txt", CLASSES, tf)
    with pytest.raises(DataError, match=r"truncated\.png: cannot read image") as info:
        strict[1]
    assert info.value.local
    # every sample broken: one error, not an endless search
    (root / "split.txt").write_text("truncated\n")
    with pytest.raises(DataError, match=r"split\.txt: none of the 1 samples loads; the first: .*truncated\.png"):
        VOCDetection(root, "split.txt", CLASSES, tf, on_bad_sample="skip")[0]
    # nothing usable at all is fatal in every mode
    (root / "split.txt").write_text("missing\nnoxml\n")
    with pytest.raises(DataError, match=r"split\.txt: no usable images: 2 dropped, .*missing\.xml: image file"):
        VOCDetection(root, "split.txt", CLASSES, on_bad_sample="skip")


def _bad_coco(root: Path) -> tuple[Path, Path]:
    for name in ("a", "b", "c"):
        _image(root / f"{name}.png")
    bad = _truncate(_image(root / "t.png", seed=5))
    _image(root / "dup.png")
    images = [
        {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
        {"id": 2, "file_name": "b.png", "width": 40, "height": 30},
        {"id": 3, "file_name": "c.png", "width": 40, "height": 30},
        {"id": 4, "file_name": "t.png", "width": 40, "height": 30},
        {"id": 5, "file_name": "gone.png"},
        {"id": 7, "file_name": "dup.png"},
        {"id": 7, "file_name": "a.png"},
        {"id": 8},  # no file_name
    ]
    anns = [
        {"image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10]},
        {"image_id": 1, "category_id": 2, "bbox": [20, 2, -15, 10]},  # inverted
        {"image_id": 2, "category_id": 3, "bbox": [2, 2, 10, 10]},
        {"image_id": 2, "category_id": 1, "bbox": [50, 40, 5, 5]},  # wholly outside 40x30
        {"image_id": 3, "category_id": 1, "bbox": "2 2 10 10"},  # malformed
        {"image_id": 3, "category_id": 9, "bbox": [1, 1, 5, 5]},  # an ignored class
        {"image_id": 4, "category_id": 2, "bbox": [1, 1, 5, 5]},
        {"image_id": 7, "category_id": 2, "bbox": [1, 1, 5, 5]},  # of the duplicated id
        {"image_id": 99, "category_id": 2, "bbox": [1, 1, 5, 5]},  # of no image
    ]
    for i, ann in enumerate(anns):
        ann["id"] = i + 1
    cats = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}, {"id": 3, "name": "triangle"},
            {"id": 9, "name": "dog"}]  # fmt: skip
    (root / "ann.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root / "ann.json", bad


def test_coco_bad_entries_are_dropped_and_listed(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    ann, bad = _bad_coco(root)
    ds = COCODetection(ann, root, CLASSES, build_transforms(True, 32, AUGMENTS), on_bad_sample="skip",
                       ignore_classes=["dog"])  # fmt: skip
    assert _kinds(ds) == {
        "missing_image": [("gone.png", "image dropped")],
        "duplicate_image_id": [("ann.json", "image dropped"), ("ann.json", "image dropped")],
        "malformed_annotation": [("ann.json", "image dropped"), ("ann.json", "object dropped")],
        "orphan_annotation": [("ann.json", "annotation dropped")],
        "invalid_box": [("ann.json", "object dropped")],
        "box_outside": [("ann.json", "object dropped")],
        "ignored_class": [("ann.json", "object dropped")],
    }
    assert [ds.image_path(i).name for i in range(len(ds))] == ["a.png", "b.png", "c.png", "t.png"]
    assert [r.labels.tolist() for r in ds.records] == [[1], [3], [], [2]]
    assert ds.num_objects() == 3
    assert ds.category_ids == [1, 2, 3]
    orphan = next(p for p in ds.problems if p.kind == "orphan_annotation")
    assert orphan.detail == "annotation 8 (id 9): unknown image_id 99"
    _check_replaced(ds, bad)
    with pytest.raises(DataError) as info:
        COCODetection(ann, root, CLASSES, ignore_classes=["dog"])
    assert str(info.value) == f"{ann}: images[6]: duplicate image id 7"


def test_coco_size_problems_in_skip_mode(tmp_path: Path) -> None:
    root = tmp_path / "c"
    _image(root / "ok.png", 40, 30)
    _image(root / "half.png", 20, 15)  # halved after annotation at 40x30
    _image(root / "small.png", 20, 15)  # declared 40x30 too, but its box fits the real image: kept
    (root / "junk.png").write_bytes(b"not an image")
    images = [{"id": i, "file_name": n, "width": 40, "height": 30}
              for i, n in enumerate(["ok.png", "half.png", "small.png", "junk.png"])]  # fmt: skip
    anns = [{"id": i + 1, "image_id": i, "category_id": 1, "bbox": [1, 1, 30, 20]} for i in range(2)]
    anns.append({"id": 3, "image_id": 2, "category_id": 1, "bbox": [1, 1, 5, 5]})
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]
    (root / "ann.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    ds = COCODetection(root / "ann.json", root, CLASSES, on_bad_sample="skip")
    assert _kinds(ds) == {
        "size_mismatch": [("half.png", "image dropped")],
        "unreadable_image": [("junk.png", "image dropped")],
        "size_differs": [("small.png", "boxes kept as annotated")],
    }
    assert [ds.image_path(i).name for i in range(len(ds))] == ["ok.png", "small.png"]
    assert len(ds.warnings) == 3 and "real size of 1 image(s)" in ds.warnings[0]
    with pytest.raises(DataError, match=r"junk\.png: cannot read image"):  # "error": the first, in scan order
        COCODetection(root / "ann.json", root, CLASSES)
    _image(root / "junk.png", 40, 30)
    with pytest.raises(DataError, match=r"half\.png: declared 40x30, real 20x15 in .*ann\.json: annotation boxes"):
        COCODetection(root / "ann.json", root, CLASSES)


def _bad_yolo(root: Path) -> tuple[Path, Path]:
    lines = {
        "a": "0 0.5 0.5 0.2 0.2\n1 0.5 0.5\n",  # second line: too few fields
        "b": "2 0.3 0.3 0.2 0.2\n0 x 0.5 0.2 0.2\n",  # non-numeric
        "c": "1 0.5 0.5 -0.005 0.2\n1 0.4 0.4 0.1 0.1\n",  # negative width (within rounding of [0, 1])
        "d": "0 0.5 0.5 0.2 0.2\n",
    }
    for name, text in lines.items():
        _image(root / f"images/train/{name}.png")
        (root / "labels/train").mkdir(parents=True, exist_ok=True)
        (root / f"labels/train/{name}.txt").write_text(text)
    _image(root / "images/train/e.png")
    (root / "labels/train/e.txt").write_bytes(b"\xff\xfe\x00 not utf-8")  # unreadable label file
    bad = _truncate(_image(root / "images/train/t.png", seed=4))
    names = ["a", "b", "gone", "c", "d", "e", "t"]
    (root / "train.txt").write_text("".join(f"images/train/{n}.png\n" for n in names))
    return root / "train.txt", bad


def test_yolo_bad_entries_are_dropped_and_listed(tmp_path: Path) -> None:
    root = tmp_path / "yolo"
    listing, bad = _bad_yolo(root)
    ds = YOLODetection(root, "train.txt", CLASSES, build_transforms(True, 32, AUGMENTS), on_bad_sample="skip")
    assert _kinds(ds) == {
        "missing_image": [("train.txt", "image dropped")],
        "malformed_annotation": [("a.txt", "object dropped"), ("b.txt", "object dropped"),
                                 ("e.txt", "image dropped")],
        "invalid_box": [("c.txt", "object dropped")],
    }  # fmt: skip
    assert [ds.image_path(i).name for i in range(len(ds))] == ["a.png", "b.png", "c.png", "d.png", "t.png"]
    assert [r.labels.tolist() for r in ds.records] == [[1], [3], [2], [1], []]
    missing = next(p for p in ds.problems if p.kind == "missing_image")
    assert missing.detail == "3: image file missing: images/train/gone.png"
    _check_replaced(ds, bad)
    # "error": the first problem in reading order (the list, then the label files) stops the run
    with pytest.raises(DataError) as info:
        YOLODetection(root, "train.txt", CLASSES)
    assert str(info.value) == f"{listing}:3: image file missing: images/train/gone.png"
    listing.write_text("images/train/a.png\n")
    with pytest.raises(DataError) as info:
        YOLODetection(root, "train.txt", CLASSES)
    assert str(info.value) == (
        f"{root / 'labels/train/a.txt'}:2: expected 'cls cx cy w h' (or 'cls x1 y1 x2 y2 ...'), got '1 0.5 0.5'"
    )
    listing.write_text("images/train/a.png\nimages/train/d.png\n")
    # pixel coordinates are a broken export, not one bad line: fatal in every mode
    (root / "labels/train/d.txt").write_text("0 20 15 10 8\n")
    with pytest.raises(DataError, match=r"d\.txt:1: YOLO coordinates must be normalised"):
        YOLODetection(root, "train.txt", CLASSES, on_bad_sample="skip")


# 3. validation: an unreadable image is a blank with no boxes, flagged ---------------------------------------------


def test_val_blank_mode(tmp_path: Path) -> None:
    root = tmp_path / "voc"
    _good_voc(root, 2)
    bad = _truncate(_image(root / "JPEGImages/t.png", 50, 20))
    _xml(root / "Annotations/t.xml", [("circle", (2, 2, 10, 10))])
    ds = VOCDetection(root, "", CLASSES, build_transforms(False, 32, []), on_bad_sample="blank")
    assert [ds.image_path(i).name for i in range(len(ds))] == ["ok0.png", "ok1.png", "t.png"]
    image, target = ds[2]
    assert image.shape == (3, 32, 32) and not image.any()
    assert target["unreadable"] is True and target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["image_id"] == 2 and "unreadable" not in ds[0][1]
    for workers in (0, 2):
        targets = _iterate(ds, workers, batch_size=3)
        assert [t.get("unreadable", False) for t in targets] == [False, False, True]
        assert [len(t["boxes"]) for t in targets] == [2, 2, 0] and "replaced" not in targets[2]
    assert bad.exists()


def _recipe(tmp_path: Path, *overrides: str):
    return load_recipe(None, [f"data.root={tmp_path / 'voc'}", 'data.format="voc"', 'data.train="train.txt"',
                              'data.val="val.txt"', "train.seed=11", "model.img_dim=32", *overrides])  # fmt: skip


def test_builder_policies_and_seed(tmp_path: Path) -> None:
    root = tmp_path / "voc"
    _good_voc(root, 3)
    (root / "train.txt").write_text("ok0\nok1\nmissing\n")
    (root / "val.txt").write_text("ok2\nmissing\n")
    recipe = _recipe(tmp_path, 'data.ignore_classes=["dog"]')
    train, val = build_dataset(recipe, "train"), build_dataset(recipe, "val")
    assert (train.on_bad_sample, val.on_bad_sample) == ("skip", "blank")
    assert train.seed == val.seed == 11 and train.ignore_classes == {"dog"}
    assert (len(train), len(val)) == (2, 1) and [p.kind for p in val.problems] == ["missing_annotation"]
    strict = _recipe(tmp_path, 'data.on_bad_sample="error"')
    with pytest.raises(DataError, match=r"missing\.xml: annotation file missing"):
        build_dataset(strict, "val")
    (root / "val.txt").write_text("ok2\n")
    assert build_dataset(strict, "val").on_bad_sample == "error"
    with pytest.raises(RecipeError, match=r"data\.ignore_classes: square also in data\.class_names"):
        _recipe(tmp_path, 'data.ignore_classes=["dog", "square"]')
    with pytest.raises(RecipeError, match=r"data\.ignore_classes: applies to formats voc and coco"):
        load_recipe(None, ['data.format="yolo"', 'data.ignore_classes=["dog"]'])


# 4. unknown class names: all of them in one error; ignore_classes drops and counts --------------------------------


@pytest.mark.parametrize("mode", ["skip", "error"])
def test_unknown_class_names_listed_at_once(tmp_path: Path, mode: str) -> None:
    root = tmp_path / "voc"
    _good_voc(root, 1)
    for i, names in enumerate([["dog", "cat"], ["dog", "circle"], ["dog", "cow"]]):
        _image(root / f"JPEGImages/x{i}.png")
        _xml(root / f"Annotations/x{i}.xml", [(n, (2, 2, 10, 10)) for n in names])
    ann = root / "Annotations"
    with pytest.raises(DataError) as info:
        VOCDetection(root, "", CLASSES, on_bad_sample=mode)
    assert str(info.value) == (
        f"{ann}: unknown class names dog (3, first in {ann / 'x0.xml'}), cat (1, first in {ann / 'x0.xml'}), "
        f"cow (1, first in {ann / 'x2.xml'}); add them to data.class_names or data.ignore_classes"
    )
    with pytest.raises(DataError, match=r"unknown class names cat \(1, .*\), cow \(1, .*\); add them"):
        VOCDetection(root, "", CLASSES, on_bad_sample=mode, ignore_classes=["dog"])
    ds = VOCDetection(root, "", CLASSES, on_bad_sample=mode, ignore_classes=["dog", "cat", "cow"])
    assert [p.kind for p in ds.problems] == ["ignored_class"] * 5
    assert ds.num_objects() == 2 + 1 and len(ds) == 4
    assert ds.warnings == [
        f"{ann}: 5 x object of a class in data.ignore_classes (object dropped): "
        f"{ann / 'x0.xml'}: object 1: class 'dog', {ann / 'x0.xml'}: object 2: class 'cat' and 3 more"
    ]

    # COCO: categories in neither list are listed with their annotation counts (also when unused)
    cats = [{"id": i + 1, "name": n} for i, n in enumerate([*CLASSES, "dog", "cat", "cow"])]
    _image(tmp_path / "c/a.png")
    anns = [{"id": i + 1, "image_id": 1, "category_id": c, "bbox": [1, 1, 5, 5]} for i, c in enumerate([4, 4, 5, 1])]
    data = {"images": [{"id": 1, "file_name": "a.png"}], "annotations": anns, "categories": cats}
    (tmp_path / "c/ann.json").write_text(json.dumps(data))
    with pytest.raises(DataError) as info:
        COCODetection(tmp_path / "c/ann.json", tmp_path / "c", CLASSES, on_bad_sample=mode)
    assert str(info.value) == (
        f"{tmp_path / 'c/ann.json'}: unknown class names dog (2, first in a.png), cat (1, first in a.png), cow (0); "
        "add them to data.class_names or data.ignore_classes"
    )
    ds = COCODetection(tmp_path / "c/ann.json", tmp_path / "c", CLASSES, on_bad_sample=mode,
                       ignore_classes=["dog", "cat", "cow"])  # fmt: skip
    assert ds.num_objects() == 1 and [p.kind for p in ds.problems] == ["ignored_class"] * 3
    anns[3]["category_id"] = 42
    (tmp_path / "c/ann.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"category ids that 'categories' does not declare: 42 \(1, first in a\.png\)"):
        COCODetection(tmp_path / "c/ann.json", tmp_path / "c", CLASSES, on_bad_sample=mode,
                      ignore_classes=["dog", "cat", "cow"])  # fmt: skip

    # YOLO: ids beyond K, each distinct id with its count
    _image(tmp_path / "y/images/train/a.png")
    (tmp_path / "y/labels/train").mkdir(parents=True)
    (tmp_path / "y/labels/train/a.txt").write_text("3 .5 .5 .1 .1\n7 .5 .5 .1 .1\n3 .5 .5 .1 .1\n0 .5 .5 .1 .1\n")
    with pytest.raises(DataError) as info:
        YOLODetection(tmp_path / "y", "images/train", CLASSES, on_bad_sample=mode)
    label = tmp_path / "y/labels/train/a.txt"
    assert str(info.value) == (
        f"{tmp_path / 'y/images/train'}: class ids beyond the 3 of data.class_names: 3 (2, first in {label}:1), "
        f"7 (1, first in {label}:2); YOLO class ids are 0-based positions in data.class_names; add the missing "
        "names, in order"
    )
