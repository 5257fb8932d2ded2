"""Pascal VOC layout: ``JPEGImages/``, ``Annotations/<id>.xml``, ``ImageSets/Main/<split>.txt``.

Pixel convention. VOC coordinates are 1-based *inclusive pixel indices*: a box with xmin=1, xmax=10 covers
the first ten pixel columns. In continuous 0-based coordinates (what torchvision's xyxy boxes, resizing
and IoU mean) those columns span [0, 10], so we read ``x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax``
(detectron2's ``pascal_voc.py`` does the same; ssd.pytorch/FaceBoxes subtract 1 from all four, which makes
every box a pixel too small). Areas then equal the devkit's ``(xmax - xmin + 1) * (ymax - ymin + 1)``
without the +1 hacks, and ``synthetic.py`` writes the inverse so the round trip is exact.

Which image. As in the VOC devkit, an image is identified by its id in ImageSets: ``JPEGImages/<id>.<ext>``
(any common image suffix, any case) wins; the XML's ``<filename>`` is only a fallback, because in hand-made
datasets it is often stale (copied XMLs, renamed files) and may name *another* existing picture. XMLs whose
``<filename>`` disagrees with the image used are reported in ``warnings``.

Bad entries (``on_bad_sample`` "skip"/"blank"; "error" raises the first). The image is dropped when its XML
is missing or malformed or its image file is missing; one ``<object>`` is dropped when only it is wrong (no
``<name>``, no or non-numeric ``<bndbox>``, an inverted box, a box wholly outside ``<size>``, a bad
``<difficult>``): the other objects of the image are still right. Class names in neither ``class_names`` nor
``ignore_classes`` stop the run, all listed in one error.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from .common import (
    IMAGE_DROPPED,
    OBJECT_DROPPED,
    BadEntry,
    DatasetError,
    DirIndex,
    check_box,
    check_inside,
    fatal,
    first_few,
    is_hidden,
    make_record,
    read_lines,
)
from .dataset import DetectionDataset, OnBadSample, StagedTransforms, Transforms


def read_split(root: Path, split: str) -> list[str]:
    """Image ids of a split file (first token of each line), or every ``Annotations/*.xml`` for ``""``."""
    if not split:
        ann_dir = root / "Annotations"
        if not ann_dir.is_dir():
            raise DatasetError(f"{ann_dir}: annotation folder missing")
        return sorted(p.stem for p in ann_dir.glob("*.xml") if not is_hidden(p, ann_dir))
    path = root / split
    lines = read_lines(path, "split file")
    # Class-specific VOC split files carry a second column ("000005 -1"); only the id matters here.
    return [line.split()[0] for line in lines if line.strip()]


def _text(node: ET.Element, tag: str) -> str | None:
    child = node.find(tag)
    return None if child is None or child.text is None else child.text.strip()


def _declared_size(root: ET.Element) -> tuple[float, float] | None:
    """(width, height) of ``<size>``, or None when absent or unusable (many converters write 0 or nothing:
    then boxes are simply not checked against it)."""
    size = root.find("size")
    if size is None:
        return None
    try:
        w, h = float(_text(size, "width") or ""), float(_text(size, "height") or "")
    except ValueError:
        return None
    return (w, h) if all(math.isfinite(v) and v > 0 for v in (w, h)) else None


def _same_image(filename: str, path: Path) -> bool:
    """Whether ``<filename>`` names ``path`` (a missing extension or a different case is not a disagreement)."""
    name = filename.replace("\\", "/").rsplit("/", 1)[-1].lower()
    return name in (path.name.lower(), path.stem.lower())


def parse_voc_xml(
    xml_path: Path, class_index: dict[str, int], ds: DetectionDataset
) -> tuple[str | None, list[list[float]], list[int], list[bool]]:
    """(filename tag, xyxy boxes in 0-based continuous px, labels 1..K, difficult flags) of one XML.

    A problem with the file raises ``BadEntry`` (the caller drops the image); a problem with one object goes
    to ``ds.drop`` and leaves out that object only. Objects of ``ds.ignore_classes`` are left out and noted;
    unknown names are counted in ``ds.unknown``."""
    try:
        tree = ET.parse(xml_path)
    except FileNotFoundError:
        raise BadEntry("missing_annotation", xml_path, f"{xml_path}: annotation file missing") from None
    except ET.ParseError as exc:
        raise BadEntry("malformed_annotation", xml_path, f"{xml_path}: malformed XML: {exc}") from None
    except OSError as exc:
        raise BadEntry("malformed_annotation", xml_path, f"{xml_path}: cannot read: {exc}") from None
    root = tree.getroot()
    size = _declared_size(root)
    boxes: list[list[float]] = []
    labels: list[int] = []
    difficult: list[bool] = []
    for i, obj in enumerate(root.findall("object"), start=1):
        where = f"{xml_path}: object {i}"
        try:
            name = _text(obj, "name")
            if not name:
                raise BadEntry("malformed_annotation", xml_path, f"{where}: no <name>")
            if name in ds.ignore_classes:
                ds.note("ignored_class", xml_path, f"object {i}: class {name!r}", OBJECT_DROPPED)
                continue
            if name not in class_index:
                ds.unknown.add(name, xml_path)
                continue
            box, is_difficult = _object_box(obj, where, xml_path, size)
        except BadEntry as exc:
            ds.drop(exc, OBJECT_DROPPED)
            continue
        boxes.append(box)
        labels.append(class_index[name])
        difficult.append(is_difficult)
    return _text(root, "filename"), boxes, labels, difficult


def _object_box(
    obj: ET.Element, where: str, xml_path: Path, size: tuple[float, float] | None
) -> tuple[list[float], bool]:
    """(continuous xyxy box, difficult flag) of one ``<object>``, or ``BadEntry``."""
    bnd = obj.find("bndbox")
    if bnd is None:
        raise BadEntry("malformed_annotation", xml_path, f"{where}: no <bndbox>")
    try:
        coords = [float(_text(bnd, tag) or "") for tag in ("xmin", "ymin", "xmax", "ymax")]
    except ValueError:
        raise BadEntry(
            "malformed_annotation", xml_path, f"{where}: <bndbox> needs numeric xmin, ymin, xmax, ymax"
        ) from None
    xmin, ymin, xmax, ymax = coords
    check_box([xmin, ymin, xmax, ymax], where, xml_path)
    box = [xmin - 1.0, ymin - 1.0, xmax, ymax]  # see the module docstring
    if size is not None:
        check_inside(box, *size, where, xml_path)
    flag = _text(obj, "difficult") or "0"
    try:
        return box, bool(int(float(flag)))
    except ValueError:
        raise BadEntry("malformed_annotation", xml_path, f"{where}: <difficult> is {flag!r}, expected 0 or 1") from None


class VOCDetection(DetectionDataset):
    """A VOC folder. ``split``: split file relative to ``root``, or ``""`` for every XML in Annotations.

    ``keep_difficult=False`` (training) drops boxes marked difficult; validation keeps them flagged in
    ``target["difficult"]`` so the evaluator can ignore them. Labels are 1..K in ``class_names`` order;
    ``category_ids`` are 1..K as well (VOC has no ids of its own). ``on_bad_sample``, ``ignore_classes``,
    ``seed``: see ``DetectionDataset``."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        class_names: Sequence[str],
        transforms: Transforms | StagedTransforms | None = None,
        keep_difficult: bool = True,
        channels: int = 3,
        *,
        on_bad_sample: OnBadSample = "error",
        ignore_classes: Sequence[str] = (),
        seed: int = 0,
    ) -> None:
        super().__init__(
            class_names, transforms, channels, keep_difficult,
            on_bad_sample=on_bad_sample, ignore_classes=ignore_classes, seed=seed,
        )  # fmt: skip
        self.root = Path(root)
        self.category_ids = list(range(1, len(self.class_names) + 1))
        class_index = {name: i + 1 for i, name in enumerate(self.class_names)}
        ids = read_split(self.root, split)
        source = self.root / split if split else self.root / "Annotations"
        if not ids:
            raise fatal("no_usable_images", source, f"{source}: no images listed")
        images = DirIndex()
        img_dir = self.root / "JPEGImages"
        stale: list[str] = []
        for idx, image_id in enumerate(ids):
            xml_path = self.root / "Annotations" / f"{image_id}.xml"
            try:
                filename, boxes, labels, difficult = parse_voc_xml(xml_path, class_index, self)
                # the id decides (see the module docstring); <filename> only when no image carries the id
                path = images.find_image(img_dir / image_id)
                if path is None and filename and images.exists(img_dir / filename):
                    path = img_dir / filename
                if path is None:
                    tried = f"{image_id}.<jpg|jpeg|png|...>" + (f", {filename}" if filename else "")
                    raise BadEntry(
                        "missing_image", xml_path, f"{xml_path}: image file missing (tried {img_dir}/ {tried})"
                    )
            except BadEntry as exc:
                self.drop(exc, IMAGE_DROPPED)
                continue
            if filename and not _same_image(filename, path):
                stale.append(f"{xml_path.name} (<filename> {filename}, used {path.name})")
                used = f"<filename> {filename}, used {path.name}"
                self.note("stale_filename", xml_path, used, "image of the id used")
            self.records.append(make_record(path, idx, boxes, labels, difficult))
        if stale:
            self.warnings.append(
                f"{self.root / 'Annotations'}: {len(stale)} annotation(s) name another image in <filename> "
                f"than the one of their id, which is used: {first_few(stale)}"
            )
        self.finish_index(
            source,
            "unknown class names",
            "add them to data.class_names or data.ignore_classes",
            own_lines=("stale_filename",),
        )
