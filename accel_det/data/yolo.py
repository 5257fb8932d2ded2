"""YOLO (ultralytics) layout: ``images/<split>/x.jpg`` with ``labels/<split>/x.txt`` beside it.

Each label line is ``cls cx cy w h``, normalised to the image size (after EXIF rotation, as ultralytics
does), with ``cls`` 0-based; a polygon line ``cls x1 y1 x2 y2 ...`` (segment datasets) gives its bounding
box. A missing label file means no objects. Coordinates beyond [0, 1] by more than
``NORMALISED_MARGIN`` mean pixel labels (a common export mistake) and are an error; smaller excursions are
rounding and are clamped at load. Class index k becomes label k+1, and ``category_ids`` are the
0-based indices so the evaluator can write predictions back in the dataset's own numbering.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from .common import (
    IMAGE_SUFFIXES,
    DatasetError,
    DetectionDataset,
    DirIndex,
    Transforms,
    check_box,
    is_hidden,
    make_record,
    read_lines,
)

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


def list_images(root: Path, split: str) -> list[Path]:
    """Images of a split: every image under a folder (recursive, sorted; hidden files and folders such as
    macOS ``._x.jpg`` are skipped), or the lines of a list file."""
    where = root / split
    if where.is_dir():
        images = sorted(
            p
            for p in where.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and not is_hidden(p, where) and p.is_file()
        )
        if not images:
            raise DatasetError(f"{where}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return images
    lines = read_lines(where, "split folder or list file")
    files = DirIndex()
    images: list[Path] = []
    for n, line in enumerate(lines, start=1):
        name = line.strip()
        if not name:
            continue
        # ultralytics writes list entries like "./images/train/a.jpg" relative to the list file; hand-made
        # lists are often relative to the dataset root. Accept both, root first.
        candidates = [root / name, where.parent / name]
        path = next((c for c in candidates if files.exists(c)), None)
        if path is None:
            raise DatasetError(f"{where}:{n}: image file missing: {name}")
        images.append(path)
    if not images:
        raise DatasetError(f"{where}: no images listed")
    return images


def parse_label_file(path: Path, num_classes: int) -> tuple[list[list[float]], list[int]]:
    """Normalised xyxy boxes and labels 1..K of one label file (no file: no objects)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return [], []
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read: {exc}") from None
    boxes: list[list[float]] = []
    labels: list[int] = []
    for n, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{n}"
        if len(fields) < 5 or (len(fields) > 5 and len(fields) % 2 == 0):
            raise DatasetError(
                f"{where}: expected 'cls cx cy w h' (or 'cls x1 y1 x2 y2 ...'), got {line.strip()!r}"
            )
        try:
            values = [float(v) for v in fields]
        except ValueError:
            raise DatasetError(f"{where}: non-numeric value in {line.strip()!r}") from None
        cls = values[0]
        if not cls.is_integer() or cls < 0:
            raise DatasetError(f"{where}: class {fields[0]} is not a non-negative integer")
        if cls >= num_classes:
            raise DatasetError(f"{where}: class {int(cls)} >= {num_classes} classes")
        if not all(math.isfinite(v) for v in values[1:]):
            raise DatasetError(f"{where}: non-finite value in {line.strip()!r}")
        outside = [f"{v:g}" for v in values[1:] if not -NORMALISED_MARGIN <= v <= 1 + NORMALISED_MARGIN]
        if outside:
            raise DatasetError(
                f"{where}: YOLO coordinates must be normalised to [0, 1], got {', '.join(outside)} "
                f"in {line.strip()!r}"
            )
        if len(values) == 5:
            cx, cy, w, h = values[1:]
            if w < 0 or h < 0:
                raise DatasetError(f"{where}: negative width or height in {line.strip()!r}")
            xyxy = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
        else:
            xs, ys = values[1::2], values[2::2]
            xyxy = [min(xs), min(ys), max(xs), max(ys)]
        check_box(xyxy, where)
        boxes.append(xyxy)
        labels.append(int(cls) + 1)
    return boxes, labels


class YOLODetection(DetectionDataset):
    """A YOLO split: ``split`` is an image folder relative to ``root`` (``images/train``) or a .txt list of
    image paths. ``image_id`` is the index in the (sorted) image list."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        class_names: Sequence[str],
        transforms: Transforms | None = None,
        channels: int = 3,
    ) -> None:
        super().__init__(class_names, transforms, channels)
        self.root = Path(root)
        self.category_ids = list(range(len(self.class_names)))
        for idx, image in enumerate(list_images(self.root, split)):
            boxes, labels = parse_label_file(label_path(image), len(self.class_names))
            self.records.append(
                make_record(image, idx, boxes, labels, [False] * len(labels), normalized=True)
            )
