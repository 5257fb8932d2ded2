"""Data readers against broken or surprising data on disk: each defect that once crashed late, trained on
the wrong boxes or silently lost objects, now an early one-line error (or a warning) naming the file."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import accel_det.data.synthetic as synthetic
from accel_det.config import SyntheticConfig
from accel_det.data import COCODetection, VOCDetection, YOLODetection, collate_fn, load_image
from accel_det.data.common import is_hidden
from accel_det.data.synthetic import is_complete, make_synthetic_voc, synthetic_dir
from accel_det.errors import DataError

CLASSES = ["circle", "square", "triangle"]
TINY = SyntheticConfig(num_train=2, num_val=1, img_size=32, max_objects=2, seed=0)


def _image(path: Path, w: int = 40, h: int = 30) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 120, dtype=np.uint8)).save(path)
    return path


def _voc_xml(
    path: Path, filename: str | None, boxes: list[tuple[int, int, int, int]], size: tuple[int, int] | None = None
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = ["<annotation>"]
    if filename is not None:
        parts.append(f"<filename>{filename}</filename>")
    if size is not None:
        parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>")
    for x1, y1, x2, y2 in boxes:
        parts.append(
            f"<object><name>circle</name><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax>"
            f"<ymax>{y2}</ymax></bndbox></object>"
        )
    path.write_text("".join(parts) + "</annotation>")


def _coco(root: Path, images: list[dict], anns: list[dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, ann in enumerate(anns):
        ann.setdefault("id", i + 1)
        ann.setdefault("category_id", 1)
    data = {"images": images, "annotations": anns, "categories": [{"id": i + 1, "name": n} for i, n in
                                                                   enumerate(CLASSES)]}  # fmt: skip
    (root / "ann.json").write_text(json.dumps(data))
    return root / "ann.json"


# 1. hidden files and folders ------------------------------------------------------------------------------


def test_hidden_files_and_folders_are_skipped(tmp_path: Path) -> None:
    root = tmp_path / "yolo"
    _image(root / "images/train/a.jpg")
    (root / "images/train/._a.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble junk")  # macOS resource fork
    _image(root / "images/train/.thumbs/b.jpg")  # a real image, but in a hidden folder
    _image(root / "images/train/sub/c.png")
    ds = YOLODetection(root, "images/train", CLASSES)
    assert [p.relative_to(root).as_posix() for p in map(ds.image_path, range(len(ds)))] == [
        "images/train/a.jpg",
        "images/train/sub/c.png",
    ]
    assert ds[0][0].shape == (3, 30, 40)

    voc = tmp_path / "voc"
    _image(voc / "JPEGImages/a.png")
    _voc_xml(voc / "Annotations/a.xml", "a.png", [(1, 1, 10, 10)])
    (voc / "Annotations/._a.xml").write_bytes(b"\x00\x05\x16\x07 junk")
    assert len(VOCDetection(voc, "", CLASSES)) == 1  # split "" = every Annotations/*.xml

    assert is_hidden(tmp_path / "r/._x.jpg", tmp_path / "r")
    assert is_hidden(tmp_path / "r/.cache/x.jpg", tmp_path / "r")
    assert not is_hidden(tmp_path / "r/sub/x.jpg", tmp_path / "r")
    assert not is_hidden(tmp_path / ".hidden_root/x.jpg", tmp_path / ".hidden_root")  # only below root counts


# 2. stale VOC <filename> ----------------------------------------------------------------------------------


def test_voc_image_id_wins_over_stale_filename(tmp_path: Path) -> None:
    root = tmp_path / "voc"
    for i in range(5):
        _image(root / f"JPEGImages/img{i}.png", 40 + i, 30)
        # copied XMLs: every <filename> names img0.png, an existing picture of another id
        _voc_xml(root / f"Annotations/img{i}.xml", "img0.png", [(1, 1, 10, 10)])
    Image.open(root / "JPEGImages/img4.png").save(root / "JPEGImages/img4.JPG")  # suffix case does not matter
    (root / "JPEGImages/img4.png").unlink()
    ds = VOCDetection(root, "", CLASSES)
    assert [ds.image_path(i).name for i in range(5)] == ["img0.png", "img1.png", "img2.png", "img3.png", "img4.JPG"]
    assert ds[2][1]["orig_size"] == (30, 42)
    assert len(ds.warnings) == 1 and "\n" not in ds.warnings[0]
    assert "4 annotation(s)" in ds.warnings[0] and "and 1 more" in ds.warnings[0]
    assert "img1.xml (<filename> img0.png, used img1.png)" in ds.warnings[0]

    # no image named by the id: <filename> is the fallback, and agrees with itself (no warning)
    _image(root / "JPEGImages/photo.jpg")
    _voc_xml(root / "Annotations/img9.xml", "photo.jpg", [(1, 1, 10, 10)])
    (root / "list.txt").write_text("img9\nimg1\n")
    ds = VOCDetection(root, "list.txt", CLASSES)
    assert ds.image_path(0).name == "photo.jpg"
    assert len(ds.warnings) == 1 and "1 annotation(s)" in ds.warnings[0] and "img1.xml" in ds.warnings[0]
    _voc_xml(root / "Annotations/img1.xml", "img1", [(1, 1, 10, 10)])  # missing extension: same image
    assert VOCDetection(root, "list.txt", CLASSES).warnings == []


# 3. YOLO pixel labels, boxes wholly outside the declared image ---------------------------------------------


def test_yolo_pixel_coordinates_are_an_error(tmp_path: Path) -> None:
    root = tmp_path / "yolo"
    _image(root / "images/train/a.png", 40, 30)
    label = root / "labels/train/a.txt"
    label.parent.mkdir(parents=True)
    label.write_text("0 0.5 0.5 0.2 0.2\n1 20 15 10 8\n")
    with pytest.raises(DataError) as info:
        YOLODetection(root, "images/train", CLASSES)
    assert str(info.value) == (
        f"{label}:2: YOLO coordinates must be normalised to [0, 1], got 20, 15, 10, 8 in '1 20 15 10 8'"
    )
    label.write_text("0 0.5 0.5 -0.2 0.2\n")
    with pytest.raises(DataError, match=r"a\.txt:1: YOLO coordinates must be normalised to \[0, 1\], got -0\.2"):
        YOLODetection(root, "images/train", CLASSES)
    # rounding just past the border is clamped, not rejected
    label.write_text("0 0.5 0.5 1.005 0.5\n2 1.004 0.5 0.2 0.2\n")
    boxes = YOLODetection(root, "images/train", CLASSES)[0][1]["boxes"].as_subclass(torch.Tensor)
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 7.5, 40.0, 22.5], [36.16, 12.0, 40.0, 18.0]]))


def test_voc_box_wholly_outside_declared_size(tmp_path: Path) -> None:
    root = tmp_path / "voc"
    _image(root / "JPEGImages/a.png", 40, 30)
    _voc_xml(root / "Annotations/a.xml", "a.png", [(1, 1, 10, 10), (45, 5, 60, 20)], size=(40, 30))
    with pytest.raises(DataError) as info:
        VOCDetection(root, "", CLASSES)
    assert str(info.value) == (
        f"{root / 'Annotations/a.xml'}: object 2: box x1=44 y1=4 x2=60 y2=20 lies wholly outside the declared "
        "40x30 image"
    )
    # partly outside: kept and clamped at load; without <size> nothing is checked at index time
    _voc_xml(root / "Annotations/a.xml", "a.png", [(30, 20, 60, 50)], size=(40, 30))
    assert VOCDetection(root, "", CLASSES)[0][1]["boxes"].tolist() == [[29.0, 19.0, 40.0, 30.0]]
    _voc_xml(root / "Annotations/a.xml", "a.png", [(45, 5, 60, 20)])
    assert len(VOCDetection(root, "", CLASSES)) == 1
    # inside the transposed size: EXIF-rotated photos are declared either way round
    _voc_xml(root / "Annotations/a.xml", "a.png", [(5, 33, 20, 38)], size=(40, 30))
    assert len(VOCDetection(root, "", CLASSES)) == 1


def test_coco_box_wholly_outside_declared_size(tmp_path: Path) -> None:
    _image(tmp_path / "c/a.png", 40, 30)
    ann = _coco(
        tmp_path / "c",
        [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
        [{"image_id": 1, "bbox": [2, 2, 5, 5]}, {"image_id": 1, "bbox": [5, 45, 10, 10], "id": 77}],
    )
    with pytest.raises(DataError) as info:
        COCODetection(ann, tmp_path / "c", CLASSES)
    assert str(info.value) == (
        f"{ann}: annotation 1 (id 77) of a.png: box x1=5 y1=45 x2=15 y2=55 lies wholly outside the declared "
        "40x30 image"
    )


# 4. COCO sizes vs the real images -----------------------------------------------------------------------------


def test_coco_declared_size_checked_against_real_image(tmp_path: Path) -> None:
    root = tmp_path / "c"
    for name in ("a.png", "b.png", "c.png", "d.png"):
        _image(root / name, 20, 15)  # halved after annotation at 40x30
    rot = Image.new("RGB", (40, 20))
    exif = rot.getexif()
    exif[0x0112] = 6  # stored 40x20, shown 20x40: the JSON may give either
    rot.save(root / "rot.jpg", exif=exif)
    images = [{"id": i, "file_name": n, "width": 40, "height": 30} for i, n in enumerate("abcd")]
    for im in images:
        im["file_name"] += ".png"
    images.append({"id": 9, "file_name": "rot.jpg", "width": 20, "height": 40})
    anns = [{"image_id": i, "bbox": [1, 1, 10, 10]} for i in range(4)] + [{"image_id": 9, "bbox": [1, 1, 18, 38]}]
    ds = COCODetection(_coco(root, images, anns), root, CLASSES)
    assert len(ds.warnings) == 1 and "\n" not in ds.warnings[0]
    assert "real size of 4 image(s)" in ds.warnings[0]
    assert "a.png (declared 40x30, real 20x15), b.png (declared 40x30, real 20x15)" in ds.warnings[0]
    assert "and 1 more" in ds.warnings[0] and "rot.jpg" not in ds.warnings[0]

    # boxes beyond the real image would be clamped away: an error naming the first file and the count
    anns[1]["bbox"] = [20, 10, 15, 15]
    anns[3]["bbox"] = [0, 0, 39, 29]
    ann = _coco(root, images, anns)
    with pytest.raises(DataError) as info:
        COCODetection(ann, root, CLASSES)
    msg = str(info.value)
    assert msg.startswith(f"{root / 'b.png'}: declared 40x30, real 20x15 in {ann}: annotation boxes reach beyond")
    assert "(2 image(s) like this)" in msg and "\n" not in msg

    # no width/height in the JSON: no check (the image header is not even read)
    (root / "a.png").write_bytes(b"not an image")
    for im in images:
        im.pop("width"), im.pop("height")
    assert COCODetection(_coco(root, images, anns), root, CLASSES).warnings == []
    images[0]["width"], images[0]["height"] = 40, 30
    with pytest.raises(DataError, match=r"a\.png: cannot read image"):
        COCODetection(_coco(root, images, anns), root, CLASSES)


# 5. float TIFFs -----------------------------------------------------------------------------------------------


def test_float_tiff_is_scaled_not_black(tmp_path: Path) -> None:
    ramp = np.linspace(0.0, 1.0, 12 * 9, dtype=np.float32).reshape(9, 12)
    Image.fromarray(ramp, "F").save(tmp_path / "unit.tif")
    assert Image.open(tmp_path / "unit.tif").mode == "F"
    image = load_image(tmp_path / "unit.tif")
    assert image.shape == (3, 9, 12) and image.dtype == torch.uint8
    assert torch.equal(image[0], torch.from_numpy(np.rint(ramp * 255).astype(np.uint8)))
    assert load_image(tmp_path / "unit.tif", channels=1).shape == (1, 9, 12)

    Image.fromarray(ramp * 1000 - 100, "F").save(tmp_path / "wide.tif")  # already 0..255-ish: clipped
    image = load_image(tmp_path / "wide.tif")
    assert image.min() == 0 and image.max() == 255 and image[0, 0, 2] == 0 and image[0, 0, 4] == 0

    ramp[3, 4] = np.nan
    Image.fromarray(ramp, "F").save(tmp_path / "nan.tif")
    with pytest.raises(DataError) as info:
        load_image(tmp_path / "nan.tif")
    assert str(info.value) == f"{tmp_path / 'nan.tif'}: float image has NaN or infinite pixel values"


# 6. sample errors are local, one line, with or without workers --------------------------------------------


def _loader_error(loader: DataLoader) -> DataError:
    """The DataError iterating ``loader`` raises, its traceback dropped: the traceback would keep the
    loader's iterator, hence its worker processes, alive into the next test."""
    try:
        for _ in loader:
            pass
    except DataError as exc:
        return exc.with_traceback(None)
    raise AssertionError("the loader raised no DataError")


def test_sample_error_is_local_and_one_line(tmp_path: Path) -> None:
    root = tmp_path / "voc"
    for i in range(4):
        _image(root / f"JPEGImages/img{i}.png")
        _voc_xml(root / f"Annotations/img{i}.xml", f"img{i}.png", [(1, 1, 10, 10)])
    bad = root / "JPEGImages/img2.png"
    bad.write_bytes(b"\x89PNG truncated")
    ds = VOCDetection(root, "", CLASSES)
    errors = [_loader_error(DataLoader(ds, batch_size=1, num_workers=n, collate_fn=collate_fn)) for n in (0, 2)]
    assert all(exc.local for exc in errors)
    lines = [str(exc) for exc in errors]
    assert lines[0] == lines[1]
    assert lines[0].startswith(f"{bad}: cannot read image: ")
    assert "\n" not in lines[0] and "Caught" not in lines[0] and "Traceback" not in lines[0]


# 7. synthetic data: one folder per config; data.root that cannot be created ----------------------------------


def test_synthetic_configs_share_a_root_without_clobbering(tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    first = make_synthetic_voc(root, TINY, CLASSES)
    assert first == synthetic_dir(root, TINY) == root / "train2_val1_32px_max2_seed0_v1"
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in first.rglob("*") if p.is_file()}
    other = TINY.model_copy(update={"seed": 1, "num_train": 3})
    second = make_synthetic_voc(root, other, CLASSES)
    assert second == root / "train3_val1_32px_max2_seed1_v1" != first
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in first.rglob("*") if p.is_file()} == before
    assert is_complete(first, TINY) and is_complete(second, other) and not is_complete(first, other)
    assert sorted(p.name for p in root.iterdir()) == sorted([first.name, second.name])

    # two processes building the same config: the later rename loses and its copy is dropped
    tmp = root / f".{first.name}.tmp-race"
    synthetic._write(tmp, TINY)
    synthetic._publish(tmp, first, TINY)
    assert not tmp.exists()
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in first.rglob("*") if p.is_file()} == before
    # a folder of that name holding anything else is never replaced
    (first / "synthetic.json").write_text('{"config": "hand-edited"}')
    synthetic._write(tmp, TINY)
    with pytest.raises(DataError, match=r"exists and is a synthetic dataset of another config"):
        synthetic._publish(tmp, first, TINY)
    assert not tmp.exists() and (first / "JPEGImages/000000.png").read_bytes() == before[
        first / "JPEGImages/000000.png"][0]  # fmt: skip


def test_synthetic_root_that_cannot_be_created(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        make_synthetic_voc("/proc/accel_det_nope/data", TINY, CLASSES)
    assert str(info.value) == "data.root: cannot create /proc/accel_det_nope/data: [Errno 2] No such file or directory"
    (tmp_path / "file").write_text("a regular file")
    with pytest.raises(DataError) as info:
        make_synthetic_voc(tmp_path / "file/data", TINY, CLASSES)
    assert str(info.value) == f"data.root: cannot create {tmp_path / 'file/data'}: [Errno 20] Not a directory"
    with pytest.raises(DataError, match=r"^data\.root: cannot create .*/file: \[Errno 17\] File exists$"):
        make_synthetic_voc(tmp_path / "file", TINY, CLASSES)


def test_synthetic_interrupted_leaves_no_temp_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_render = synthetic.render

    def render(index: int, cfg: SyntheticConfig):
        if index == 1:
            raise KeyboardInterrupt
        return real_render(index, cfg)

    monkeypatch.setattr(synthetic, "render", render)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic_voc(tmp_path / "shapes", TINY, CLASSES)
    assert list((tmp_path / "shapes").iterdir()) == []

    def full(index: int, cfg: SyntheticConfig):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(synthetic, "render", full)
    with pytest.raises(DataError) as info:
        make_synthetic_voc(tmp_path / "shapes", TINY, CLASSES)
    assert str(info.value) == (
        f"data.root: cannot write {synthetic_dir(tmp_path / 'shapes', TINY)}: [Errno 28] No space left on device"
    )
    assert list((tmp_path / "shapes").iterdir()) == []


# 8. object counts ---------------------------------------------------------------------------------------------


def test_num_objects_counts_what_training_sees(tmp_path: Path) -> None:
    root = tmp_path / "c"
    _image(root / "a.png", 40, 30)
    anns = [
        {"image_id": 1, "bbox": [1, 1, 10, 10]},
        {"image_id": 1, "bbox": [1, 1, 10, 10], "iscrowd": 1},
        {"image_id": 1, "bbox": [5, 5, 0, 10]},  # zero width: SanitizeBoundingBoxes drops it
    ]
    ann = _coco(root, [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}], anns)
    assert COCODetection(ann, root, CLASSES, keep_crowd=True).num_objects() == 2
    assert COCODetection(ann, root, CLASSES, keep_crowd=False).num_objects() == 1
