"""YOLO (ultralytics) layout: ``images/<split>/x.jpg`` with ``labels/<split>/x.txt`` beside it.

Each label line is ``cls cx cy w h``, normalised to the image size (after EXIF rotation, as ultralytics
does), with ``cls`` 0-based; a polygon line ``cls x1 y1 x2 y2 ...`` (segment datasets) gives its bounding
box. A missing label file means no objects. Coordinates beyond [0, 1] by more than
``NORMALISED_MARGIN`` mean pixel labels (a common export mistake) and are an error; smaller excursions are
rounding and are clamped at load. Class index k becomes label k+1, and ``category_ids`` are the
0-based indices so the evaluator can write predictions back in the dataset's own numbering.

Bad entries (``on_bad_sample`` "skip"/"blank"; "error" raises the first). The image is dropped when a list
file names a missing image or its label file cannot be read; one label line (one object) is dropped when
only it is wrong (field count, non-numeric or non-integer class, non-finite values, negative size): the
file's other lines are still right. Pixel coordinates stop the run (a whole export went wrong), and so do
class ids >= K, all listed in one error. ``data.ignore_classes`` does not apply: ids are positions in
``class_names``, and an ignored name has none.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from .common import (
    IMAGE_DROPPED,
    IMAGE_SUFFIXES,
    OBJECT_DROPPED,
    BadEntry,
    DirIndex,
    check_box,
    fatal,
    is_hidden,
    make_record,
    read_lines,
)
from .dataset import DetectionDataset, OnBadSample, StagedTransforms, Transforms

NORMALISED_MARGIN = 0.01  # rounding slack around [0, 1] before a coordinate counts as "in pixels"


def label_path(image: Path) -> Path:
    """The ultralytics rule: replace the *last* ``images`` folder with ``labels``, suffix ``.txt``; without
    an ``images`` folder the label file sits next to the image."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def list_images(root: Path, split: str, ds: DetectionDataset) -> list[Path]:
    """Images of a split: every image under a folder (recursive, sorted; hidden files and folders such as
    macOS ``._x.jpg`` are skipped), or the lines of a list file (entries naming no file go to ``ds.drop``)."""
    where = root / split
    if where.is_dir():
        images = sorted(
            p
            for p in where.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and not is_hidden(p, where) and p.is_file()
        )
        if not images:
            raise fatal("no_usable_images", where, f"{where}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return images
    lines = read_lines(where, "split folder or list file")
    files = DirIndex()
    images = []
    for n, line in enumerate(lines, start=1):
        name = line.strip()
        if not name:
            continue
        # ultralytics writes list entries like "./images/train/a.jpg" relative to the list file; hand-made
        # lists are often relative to the dataset root. Accept both, root first.
        candidates = [root / name, where.parent / name]
        path = next((c for c in candidates if files.exists(c)), None)
        if path is None:
            ds.drop(BadEntry("missing_image", where, f"{where}:{n}: image file missing: {name}"), IMAGE_DROPPED)
            continue
        images.append(path)
    if not images and not ds.problems:
        raise fatal("no_usable_images", where, f"{where}: no images listed")
    return images


def parse_label_file(path: Path, ds: DetectionDataset) -> tuple[list[list[float]], list[int]]:
    """Normalised xyxy boxes and labels 1..K of one label file (no file: no objects). A bad line goes to
    ``ds.drop``, a class id >= K to ``ds.unknown``; an unreadable file raises ``BadEntry``."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return [], []
    except (OSError, UnicodeDecodeError) as exc:
        raise BadEntry("malformed_annotation", path, f"{path}: cannot read: {exc}") from None
    boxes: list[list[float]] = []
    labels: list[int] = []
    for n, line in enumerate(lines, start=1):
        if not line.split():
            continue
        try:
            parsed = _parse_line(line, f"{path}:{n}", path, len(ds.class_names))
        except BadEntry as exc:
            ds.drop(exc, OBJECT_DROPPED)
            continue
        if isinstance(parsed, int):
            ds.unknown.add(str(parsed), f"{path}:{n}")
            continue
        boxes.append(parsed[1])
        labels.append(parsed[0])
    return boxes, labels


def _parse_line(line: str, where: str, path: Path, num_classes: int) -> tuple[int, list[float]] | int:
    """(label 1..K, normalised xyxy) of one label line; a class id >= ``num_classes`` alone; ``BadEntry``
    for a malformed line; ``DatasetError`` for pixel coordinates."""
    fields = line.split()
    if len(fields) < 5 or (len(fields) > 5 and len(fields) % 2 == 0):
        raise BadEntry(
            "malformed_annotation",
            path,
            f"{where}: expected 'cls cx cy w h' (or 'cls x1 y1 x2 y2 ...'), got {line.strip()!r}",
        )
    try:
        values = [float(v) for v in fields]
    except ValueError:
        raise BadEntry("malformed_annotation", path, f"{where}: non-numeric value in {line.strip()!r}") from None
    cls = values[0]
    if not cls.is_integer() or cls < 0:
        raise BadEntry("malformed_annotation", path, f"{where}: class {fields[0]} is not a non-negative integer")
    if cls >= num_classes:
        return int(cls)
    if not all(math.isfinite(v) for v in values[1:]):
        raise BadEntry("invalid_box", path, f"{where}: non-finite value in {line.strip()!r}")
    outside = [f"{v:g}" for v in values[1:] if not -NORMALISED_MARGIN <= v <= 1 + NORMALISED_MARGIN]
    if outside:
        raise fatal(
            "pixel_coordinates", path,
            f"{where}: YOLO coordinates must be normalised to [0, 1], got {', '.join(outside)} in {line.strip()!r}",
        )
    if len(values) == 5:
        cx, cy, w, h = values[1:]
        if w < 0 or h < 0:
            raise BadEntry("invalid_box", path, f"{where}: negative width or height in {line.strip()!r}")
        xyxy = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
    else:
        xs, ys = values[1::2], values[2::2]
        xyxy = [min(xs), min(ys), max(xs), max(ys)]
    check_box(xyxy, where, path)
    return int(cls) + 1, xyxy


class YOLODetection(DetectionDataset):
    """A YOLO split: ``split`` is an image folder relative to ``root`` (``images/train``) or a .txt list of
    image paths. ``image_id`` is the index in the (sorted) image list. ``on_bad_sample``, ``seed``: see
    ``DetectionDataset``."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        class_names: Sequence[str],
        transforms: Transforms | StagedTransforms | None = None,
        channels: int = 3,
        *,
        on_bad_sample: OnBadSample = "error",
        seed: int = 0,
    ) -> None:
        super().__init__(class_names, transforms, channels, on_bad_sample=on_bad_sample, seed=seed)
        self.root = Path(root)
        self.category_ids = list(range(len(self.class_names)))
        for idx, image in enumerate(list_images(self.root, split, self)):
            try:
                boxes, labels = parse_label_file(label_path(image), self)
            except BadEntry as exc:
                self.drop(exc, IMAGE_DROPPED)
                continue
            self.records.append(make_record(image, idx, boxes, labels, [False] * len(labels), normalized=True))
        k = len(self.class_names)
        self.finish_index(
            self.root / split,
            f"class ids beyond the {k} of data.class_names:",
            "YOLO class ids are 0-based positions in data.class_names; add the missing names, in order",
        )
