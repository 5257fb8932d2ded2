"""Data package: readers agree across formats, transforms keep boxes on their pixels, errors name files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms import v2

from accel_det.config import SyntheticConfig
from accel_det.config_io import load_recipe
from accel_det.data import (
    COCODetection,
    DatasetError,
    VOCDetection,
    YOLODetection,
    build_datasets,
    build_loaders,
    build_transforms,
    collate_fn,
    load_image,
    make_synthetic_voc,
)
from accel_det.data.synthetic import render, synthetic_dir
from accel_det.data.yolo import label_path

CLASSES = ["circle", "square", "triangle"]

# (width, height, [(class name, continuous xyxy box)]) -- one image has no objects.
SAMPLES = [
    (64, 48, [("square", (4, 6, 30, 40)), ("triangle", (33, 0, 64, 20))]),
    (40, 40, []),
    (50, 70, [("circle", (10, 12, 45, 69)), ("circle", (0, 0, 8, 9)), ("square", (20, 30, 21, 31))]),
]
COCO_IDS = {"circle": 3, "square": 7, "triangle": 11}


def _save_image(path: Path, w: int, h: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_voc(root: Path, difficult_last: bool = False) -> Path:
    (root / "ImageSets/Main").mkdir(parents=True)
    (root / "Annotations").mkdir()
    ids = []
    for i, (w, h, objs) in enumerate(SAMPLES):
        ids.append(f"img{i}")
        _save_image(root / "JPEGImages" / f"img{i}.png", w, h, i)
        xml = [
            f"<annotation><filename>img{i}.png</filename><size><width>{w}</width><height>{h}</height></size>"
        ]
        for k, (name, (x1, y1, x2, y2)) in enumerate(objs):
            flag = int(difficult_last and k == len(objs) - 1)
            # VOC is 1-based inclusive: continuous [x1, x2] covers pixels x1+1 .. x2 in VOC numbering
            xml.append(
                f"<object><name>{name}</name><difficult>{flag}</difficult><bndbox><xmin>{x1 + 1}</xmin>"
                f"<ymin>{y1 + 1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
            )
        (root / "Annotations" / f"img{i}.xml").write_text("".join(xml) + "</annotation>")
    (root / "ImageSets/Main/all.txt").write_text("\n".join(ids) + "\n")
    return root


def write_coco(root: Path) -> Path:
    images, anns = [], []
    for i, (w, h, objs) in enumerate(SAMPLES):
        _save_image(root / "imgs" / f"img{i}.png", w, h, i)
        images.append({"id": 100 + i, "file_name": f"img{i}.png", "width": w, "height": h})
        for name, (x1, y1, x2, y2) in objs:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": 100 + i,
                    "category_id": COCO_IDS[name],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "iscrowd": 0,
                    "area": (x2 - x1) * (y2 - y1),
                }
            )
    cats = [{"id": COCO_IDS[n], "name": n} for n in reversed(CLASSES)]  # file order != class order
    (root / "ann.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root


def write_yolo(root: Path) -> Path:
    for i, (w, h, objs) in enumerate(SAMPLES):
        _save_image(root / "images/train" / f"img{i}.png", w, h, i)
        if not objs:
            continue  # a missing label file means no objects
        lines = []
        for n, (x1, y1, x2, y2) in objs:
            cx, cy, bw, bh = (x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h
            lines.append(f"{CLASSES.index(n)} {cx:.7f} {cy:.7f} {bw:.7f} {bh:.7f}")
        (root / "labels/train").mkdir(parents=True, exist_ok=True)
        (root / "labels/train" / f"img{i}.txt").write_text("\n".join(lines) + "\n")
    return root


def _expected(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    objs = SAMPLES[i][2]
    boxes = torch.tensor([b for _, b in objs], dtype=torch.float32).reshape(-1, 4)
    labels = torch.tensor([CLASSES.index(n) + 1 for n, _ in objs], dtype=torch.int64)
    return boxes, labels


def test_readers_agree(tmp_path: Path) -> None:
    voc = VOCDetection(write_voc(tmp_path / "voc"), "ImageSets/Main/all.txt", CLASSES)
    coco = COCODetection(write_coco(tmp_path / "coco") / "ann.json", tmp_path / "coco/imgs", CLASSES)
    yolo = YOLODetection(write_yolo(tmp_path / "yolo"), "images/train", CLASSES)
    assert len(voc) == len(coco) == len(yolo) == len(SAMPLES)
    assert (
        coco.category_ids == [3, 7, 11] and voc.category_ids == [1, 2, 3] and yolo.category_ids == [0, 1, 2]
    )
    for i, (w, h, _) in enumerate(SAMPLES):
        boxes, labels = _expected(i)
        for ds, tol in ((voc, 0.0), (coco, 0.0), (yolo, 1e-3)):
            image, target = ds[i]
            assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8
            assert image.shape == (3, h, w) and target["orig_size"] == (h, w)
            assert isinstance(target["boxes"], tv_tensors.BoundingBoxes)
            assert target["boxes"].canvas_size == (h, w)
            torch.testing.assert_close(target["boxes"].as_subclass(torch.Tensor), boxes, atol=tol, rtol=0)
            assert torch.equal(target["labels"], labels) and target["labels"].dtype == torch.int64
            assert target["difficult"].dtype == torch.bool and not target["difficult"].any()
        assert voc[i][1]["image_id"] == yolo[i][1]["image_id"] == i
        assert coco[i][1]["image_id"] == 100 + i
        assert coco.image_path(i).name == voc.image_path(i).name == f"img{i}.png"
        # label -> the dataset's own category id, and back
        assert [coco.category_ids[k - 1] for k in coco[i][1]["labels"].tolist()] == [
            COCO_IDS[n] for n, _ in SAMPLES[i][2]
        ]


def test_voc_difficult_and_all_split(tmp_path: Path) -> None:
    root = write_voc(tmp_path / "voc", difficult_last=True)
    keep = VOCDetection(root, "", CLASSES, keep_difficult=True)  # "" = every xml
    drop = VOCDetection(root, "", CLASSES, keep_difficult=False)
    assert len(keep) == 3
    assert keep[0][1]["difficult"].tolist() == [False, True]
    assert drop[0][1]["labels"].tolist() == [2] and drop[0][1]["difficult"].tolist() == [False]


def test_coco_crowd_and_category_errors(tmp_path: Path) -> None:
    root = write_coco(tmp_path / "coco")
    data = json.loads((root / "ann.json").read_text())
    data["annotations"][0]["iscrowd"] = 1
    (root / "ann.json").write_text(json.dumps(data))
    ds = COCODetection(root / "ann.json", root / "imgs", CLASSES)
    assert ds[0][1]["difficult"].tolist() == [True, False]
    assert COCODetection(root / "ann.json", root / "imgs", CLASSES, keep_crowd=False)[0][1][
        "labels"
    ].tolist() == [3]
    with pytest.raises(DatasetError, match=r"ann\.json: unknown class names circle \(2, first in img2\.png\); add"):
        COCODetection(root / "ann.json", root / "imgs", ["square", "triangle"])
    with pytest.raises(DatasetError, match=r"ann\.json: no category for class name\(s\) 'dog'"):
        COCODetection(root / "ann.json", root / "imgs", [*CLASSES, "dog"])
    (root / "bad.json").write_text('{"images": [')
    with pytest.raises(DatasetError, match=r"bad\.json: malformed JSON"):
        COCODetection(root / "bad.json", root / "imgs", CLASSES)


def test_yolo_list_file_and_label_path(tmp_path: Path) -> None:
    root = write_yolo(tmp_path / "yolo")
    (root / "train.txt").write_text("./images/train/img2.png\nimages/train/img0.png\n")
    ds = YOLODetection(root, "train.txt", CLASSES)
    assert [p.name for p in map(ds.image_path, range(len(ds)))] == ["img2.png", "img0.png"]
    torch.testing.assert_close(
        ds[0][1]["boxes"].as_subclass(torch.Tensor), _expected(2)[0], atol=1e-3, rtol=0
    )
    assert label_path(Path("d/images/x/images/a.jpg")) == Path("d/images/x/labels/a.txt")


def test_error_messages_name_the_file(tmp_path: Path) -> None:
    root = write_voc(tmp_path / "voc")
    xml = root / "Annotations/img0.xml"
    xml.write_text(xml.read_text().replace("<name>triangle</name>", "<name>dog</name>"))
    with pytest.raises(DatasetError) as info:
        VOCDetection(root, "", CLASSES)
    assert str(info.value) == (
        f"{root / 'Annotations'}: unknown class names dog (1, first in {xml}); add them to data.class_names or "
        "data.ignore_classes"
    )
    xml.write_text("<annotation><object>")
    with pytest.raises(DatasetError, match=r"img0\.xml: malformed XML"):
        VOCDetection(root, "", CLASSES)
    xml.write_text("<annotation><object><name>circle</name><bndbox><xmin>9</xmin><ymin>1</ymin>"
                   "<xmax>5</xmax><ymax>8</ymax></bndbox></object></annotation>")  # fmt: skip
    with pytest.raises(DatasetError, match=r"img0\.xml: object 1: box .* x2 < x1"):
        VOCDetection(root, "", CLASSES)
    xml.unlink()
    (root / "JPEGImages/img1.png").unlink()
    with pytest.raises(DatasetError, match=r"img1\.xml: image file missing"):
        VOCDetection(root, "", CLASSES)

    yroot = write_yolo(tmp_path / "yolo")
    with (yroot / "labels/train/img0.txt").open("a") as f:
        f.write("5 0.5 0.5 0.1 0.1\n")
    with pytest.raises(DatasetError, match=r"class ids beyond the 3 of data\.class_names: 5 \(1, first in .*"
                       r"labels/train/img0\.txt:3\)"):  # fmt: skip
        YOLODetection(yroot, "images/train", CLASSES)
    with pytest.raises(DatasetError, match=r"nope\.png: image file missing"):
        load_image(tmp_path / "nope.png")


def test_exif_orientation_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").shape == (3, 40, 20)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "LA", "I;16"])
def test_image_modes(tmp_path: Path, mode: str) -> None:
    path = tmp_path / f"x_{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
    Image.new(mode, (12, 9)).save(path)
    assert load_image(path).shape == (3, 9, 12)
    assert load_image(path, channels=1).shape == (1, 9, 12)
    with pytest.raises(DatasetError, match="2 channels"):
        load_image(path, channels=2)


def _rect_sample(w: int = 80, h: int = 60, box: tuple[int, int, int, int] = (10, 20, 30, 45)):
    pixels = torch.zeros(3, h, w, dtype=torch.uint8)
    pixels[:, box[1] : box[3], box[0] : box[2]] = 255
    target = {
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor([box], dtype=torch.float32), format="XYXY", canvas_size=(h, w)
        ),
        "labels": torch.tensor([1]),
        "difficult": torch.tensor([False]),
        "image_id": 0,
        "orig_size": (h, w),
    }
    return tv_tensors.Image(pixels), target


def _mask_box(image: torch.Tensor) -> torch.Tensor:
    ys, xs = torch.nonzero((image > 200).all(0), as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def test_transforms_keep_boxes_on_their_pixels() -> None:
    tf = build_transforms(True, 64, ["hflip"])
    flip = next(t for t in tf.transforms if isinstance(t, v2.RandomHorizontalFlip))
    flip.p = 1.0
    image, target = tf(*_rect_sample())
    assert image.shape == (3, 64, 64) and target["boxes"].canvas_size == (64, 64)
    box = target["boxes"][0].as_subclass(torch.Tensor)
    torch.testing.assert_close(box, _mask_box(image), atol=1.5, rtol=0)
    assert box[0] > 32  # flipped to the right half
    # the geometric augments together, over several random draws: every kept box stays on its rectangle
    tf = build_transforms(True, 64, ["hflip", "iou_crop", "zoom_out"])
    for seed in range(12):
        torch.manual_seed(seed)
        image, target = tf(*_rect_sample())
        if len(target["boxes"]):
            ref = _mask_box(image)
            torch.testing.assert_close(target["boxes"][0].as_subclass(torch.Tensor), ref, atol=2.0, rtol=0)
    with pytest.raises(ValueError, match="known: mosaic, photometric, color_jitter, grayscale, zoom_out, iou_crop, "):
        build_transforms(True, 64, ["cutout"])


def test_sanitize_drops_degenerate_with_labels_and_flags() -> None:
    image, target = _rect_sample()
    target["boxes"] = tv_tensors.BoundingBoxes(
        torch.tensor([[0, 0, 10, 10], [5, 5, 5, 20], [20, 20, 30, 30]], dtype=torch.float32),
        format="XYXY",
        canvas_size=(60, 80),
    )
    target["labels"] = torch.tensor([1, 2, 3])
    target["difficult"] = torch.tensor([False, True, False])
    _, out = build_transforms(True, 64, [])(image, target)
    assert out["labels"].tolist() == [1, 3] and out["difficult"].tolist() == [False, False]
    assert out["boxes"].shape == (2, 4)
    _, out = build_transforms(False, 64, [])(image, target)  # val keeps every gt box
    assert out["labels"].tolist() == [1, 2, 3]


def test_synthetic_is_deterministic(tmp_path: Path) -> None:
    cfg = SyntheticConfig(num_train=4, num_val=2, img_size=64, max_objects=3, seed=5)
    a = make_synthetic_voc(tmp_path / "a", cfg, CLASSES)
    assert a == synthetic_dir(tmp_path / "a", cfg) == tmp_path / "a/train4_val2_64px_max3_seed5_v1"
    b = make_synthetic_voc(tmp_path / "b", cfg, list(reversed(CLASSES)))
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 6 * 2 + 3
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    c = make_synthetic_voc(tmp_path / "c", cfg.model_copy(update={"seed": 6}), CLASSES)
    assert (a / "JPEGImages/000000.png").read_bytes() != (c / "JPEGImages/000000.png").read_bytes()
    assert not [p for p in tmp_path.rglob(".*")]  # no temp dirs left behind
    with pytest.raises(DatasetError, match="exactly the classes circle, square, triangle"):
        make_synthetic_voc(tmp_path / "d", cfg, ["circle", "square"])
    # the VOC round trip is exact: the reader's box covers exactly the shape's drawn pixels
    ds = VOCDetection(a, "ImageSets/Main/train.txt", CLASSES)
    for i in range(len(ds)):
        _, objects = render(i, cfg)
        boxes = ds[i][1]["boxes"].as_subclass(torch.Tensor)
        assert boxes.tolist() == [[x0, y0, x1 + 1, y1 + 1] for _, (x0, y0, x1, y1) in objects]
        assert [CLASSES[k - 1] for k in ds[i][1]["labels"].tolist()] == [n for n, _ in objects]
        assert 1 <= len(boxes) <= 3 and (boxes[:, 2:] - boxes[:, :2] >= 0.12 * 64 - 1).all()
    # a complete folder published by someone else is kept, not replaced
    mtime = (a / "synthetic.json").stat().st_mtime_ns
    assert make_synthetic_voc(tmp_path / "a", cfg, CLASSES) == a
    assert (a / "synthetic.json").stat().st_mtime_ns == mtime
    assert not [p for p in tmp_path.rglob(".*")]


def test_build_datasets_and_loaders(tmp_path: Path) -> None:
    overrides = [
        f"data.root={tmp_path / 'shapes'}",
        "data.synthetic.num_train=8",
        "data.synthetic.num_val=3",
        "data.synthetic.img_size=64",
        "model.img_dim=48",
        "data.batch_size=4",
        "data.num_workers=0",
        'data.augments=["photometric", "zoom_out", "iou_crop", "hflip"]',
    ]
    recipe = load_recipe(None, overrides)
    train_ds, val_ds = build_datasets(recipe)
    assert (len(train_ds), len(val_ds)) == (8, 3)
    stamp = synthetic_dir(tmp_path / "shapes", recipe.data.synthetic) / "synthetic.json"
    mtime = stamp.stat().st_mtime_ns
    build_datasets(recipe)  # complete folder: not regenerated
    assert stamp.stat().st_mtime_ns == mtime
    image, target = val_ds[0]
    assert image.shape == (3, 48, 48) and target["orig_size"] == (64, 64) and target["image_id"] == 0

    train_loader, val_loader = build_loaders(recipe, train_ds, val_ds, seed=recipe.train.seed)
    images, targets = next(iter(train_loader))
    assert type(images) is torch.Tensor and images.dtype == torch.uint8 and images.shape == (4, 3, 48, 48)
    for t in targets:
        # plain tensors (no tv_tensors subclass past the batch boundary), and the file it came from
        assert all(type(v) is torch.Tensor for k, v in t.items() if k != "file") and Path(t["file"]).is_file()
        assert t["boxes"].dtype == torch.float32 and t["boxes"].shape[1:] == (4,)
        assert t["labels"].dtype == torch.int64 and t["labels"].shape == t["difficult"].shape
        assert ((t["labels"] >= 1) & (t["labels"] <= 3)).all() and t["difficult"].dtype == torch.bool
        assert t["image_id"].shape == () and t["orig_size"].tolist() == [64, 64]
    assert sum(len(b[0]) for b in val_loader) == 3
    order = [[int(t["image_id"]) for t in b[1]] for b in build_loaders(recipe, train_ds, val_ds, seed=1)[0]]
    again = [[int(t["image_id"]) for t in b[1]] for b in build_loaders(recipe, train_ds, val_ds, seed=1)[0]]
    assert order == again and sorted(sum(order, [])) == list(range(8))

    # a new synthetic config gets a folder of its own beside the first; a folder that is not ours is never
    # overwritten
    other = load_recipe(None, [*overrides, "data.synthetic.num_train=5"])
    assert len(build_datasets(other)[0]) == 5
    train_txt = synthetic_dir(tmp_path / "shapes", other.data.synthetic) / "ImageSets/Main/train.txt"
    assert len(train_txt.read_text().split()) == 5
    assert stamp.stat().st_mtime_ns == mtime
    mine = synthetic_dir(tmp_path / "mine", recipe.data.synthetic)
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(DatasetError, match="is not a synthetic dataset"):
        build_datasets(load_recipe(None, [*overrides, f"data.root={tmp_path / 'mine'}"]))
    assert (mine / "notes.txt").read_text() == "precious"


def test_collate_gray_and_plain_loader(tmp_path: Path) -> None:
    ds = VOCDetection(
        write_voc(tmp_path / "voc"),
        "",
        CLASSES,
        transforms=build_transforms(False, 32, [], channels=1),
        channels=1,
    )
    images, targets = next(iter(DataLoader(ds, batch_size=3, collate_fn=collate_fn, num_workers=0)))
    assert images.shape == (3, 1, 32, 32) and type(images) is torch.Tensor
    assert [len(t["boxes"]) for t in targets] == [2, 0, 3]
    assert targets[1]["boxes"].shape == (0, 4) and targets[1]["labels"].dtype == torch.int64
    assert targets[2]["orig_size"].tolist() == [70, 50]
    # images without objects go through every training augment
    ds.transforms = build_transforms(True, 32, ["photometric", "zoom_out", "iou_crop", "hflip"], channels=1)
    for epoch in range(5):
        ds.set_epoch(epoch)
        image, target = ds[1]
        assert (
            image.shape == (1, 32, 32) and target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
        )


def _same(a: tuple, b: tuple) -> bool:
    (ia, ta), (ib, tb) = a, b
    return torch.equal(ia, ib) and all(
        torch.equal(ta[k].as_subclass(torch.Tensor), tb[k].as_subclass(torch.Tensor)) for k in ("boxes", "labels")
    )


def test_augment_draw_depends_on_seed_epoch_index_only(tmp_path: Path, monkeypatch) -> None:
    # What once needed the rank mixed into worker seeds: no process or worker RNG state reaches the draw,
    # and drawing does not move the caller's RNG stream (the training loop's, with num_workers = 0).
    tf = build_transforms(True, 32, ["photometric", "zoom_out", "iou_crop", "hflip"])
    ds = VOCDetection(write_voc(tmp_path / "voc"), "", CLASSES, transforms=tf)
    ref = [ds[i] for i in range(len(ds))]
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        torch.manual_seed(100 + int(rank))
        state = torch.get_rng_state()
        assert all(_same(ds[i], ref[i]) for i in reversed(range(len(ds))))
        assert torch.equal(torch.get_rng_state(), state)
    assert _same(ds[-1], ref[-1])  # a negative index is the same sample, the same draw
    ds.set_epoch(1)
    assert not all(_same(ds[i], ref[i]) for i in range(len(ds)))
    ds.set_epoch(0)
    ds.seed = 1
    assert not all(_same(ds[i], ref[i]) for i in range(len(ds)))
