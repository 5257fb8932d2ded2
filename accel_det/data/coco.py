"""COCO instances JSON, read with ``json`` alone (pycocotools is the evaluator's business, not the loader's).

Category ids are whatever the file says (COCO's own run 1..90 with holes); labels are 1..K in
``class_names`` order, found by category *name*, and ``category_ids[label - 1]`` maps back for the
evaluator. ``iscrowd=1`` (and ``ignore=1``, as in CrowdHuman-style files) become ``difficult``.

Sizes. Where ``images[].width/height`` are given, a box wholly outside them is an error, and they are checked
against each image's real size (a header read, no decoding; either orientation matches, as EXIF rotation
swaps them): images resized after annotation keep full-size boxes that the loader would clamp away. A
mismatch is a warning in ``warnings``; an error when an annotation box reaches beyond the real image.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import (
    DatasetError,
    DetectionDataset,
    DirIndex,
    Transforms,
    check_box,
    check_inside,
    first_few,
    image_size,
    make_record,
)

SIZE_SLACK = 1.0  # px a box may reach past the real image before the size mismatch counts as losing boxes


def _load_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"{path}: annotation file missing") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: malformed JSON: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{path}: not a COCO instances file (no 'images' list)")
    if not isinstance(data.get("categories"), list):
        raise DatasetError(f"{path}: not a COCO instances file (no 'categories' list)")
    return data


def _category_map(path: Path, categories: list[Any], class_names: list[str]) -> dict[int, int]:
    """COCO category id -> label 1..K, matched by name; every category and every class must match."""
    by_name: dict[str, int] = {}
    for i, cat in enumerate(categories):
        if (
            not isinstance(cat, dict)
            or not isinstance(cat.get("id"), int)
            or not isinstance(cat.get("name"), str)
        ):
            raise DatasetError(f"{path}: categories[{i}]: needs an integer 'id' and a string 'name'")
        if cat["name"] in by_name:
            raise DatasetError(f"{path}: categories[{i}]: duplicate category name {cat['name']!r}")
        if cat["name"] not in class_names:
            raise DatasetError(
                f"{path}: category {cat['name']!r} (id {cat['id']}) is not in data.class_names "
                f"({', '.join(class_names)})"
            )
        by_name[cat["name"]] = cat["id"]
    missing = [n for n in class_names if n not in by_name]
    if missing:
        raise DatasetError(f"{path}: no category for class name(s) {', '.join(map(repr, missing))}")
    return {by_name[name]: i + 1 for i, name in enumerate(class_names)}


def _declared_size(img: dict[str, Any]) -> tuple[float, float] | None:
    """images[].(width, height), or None when either is missing or not a positive number (no check then)."""
    w, h = img.get("width"), img.get("height")
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf") for v in (w, h))
    return (float(w), float(h)) if ok else None


class COCODetection(DetectionDataset):
    """One COCO split: ``ann_file`` (instances JSON) and the folder its ``file_name``s are relative to.

    Images without annotations are kept (empty targets): they are valid negatives and the evaluator must
    see every image. ``keep_crowd=False`` (training, as in torchvision's references) drops crowd boxes."""

    def __init__(
        self,
        ann_file: str | Path,
        image_dir: str | Path,
        class_names: Sequence[str],
        transforms: Transforms | None = None,
        channels: int = 3,
        keep_crowd: bool = True,
    ) -> None:
        super().__init__(class_names, transforms, channels, keep_difficult=keep_crowd)
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        data = _load_json(self.ann_file)
        cat_to_label = _category_map(self.ann_file, data["categories"], self.class_names)
        self.category_ids = sorted(cat_to_label, key=cat_to_label.__getitem__)

        order: dict[int, int] = {}
        files: list[str] = []
        sizes: list[tuple[float, float] | None] = []
        for i, img in enumerate(data["images"]):
            if not isinstance(img, dict) or not isinstance(img.get("id"), int) or not img.get("file_name"):
                raise DatasetError(f"{self.ann_file}: images[{i}]: needs an integer 'id' and a 'file_name'")
            if img["id"] in order:
                raise DatasetError(f"{self.ann_file}: images[{i}]: duplicate image id {img['id']}")
            order[img["id"]] = i
            files.append(str(img["file_name"]))
            sizes.append(_declared_size(img))
        if not files:
            raise DatasetError(f"{self.ann_file}: no images")

        per_image: list[tuple[list[list[float]], list[int], list[bool]]] = [([], [], []) for _ in files]
        for i, ann in enumerate(data.get("annotations") or []):
            where = (
                f"{self.ann_file}: annotation {i} (id {ann.get('id', '?') if isinstance(ann, dict) else '?'})"
            )
            if not isinstance(ann, dict):
                raise DatasetError(f"{where}: not an object")
            if ann.get("image_id") not in order:
                raise DatasetError(f"{where}: unknown image_id {ann.get('image_id')!r}")
            if ann.get("category_id") not in cat_to_label:
                raise DatasetError(f"{where}: unknown category_id {ann.get('category_id')!r}")
            bbox = ann.get("bbox")
            if (
                not isinstance(bbox, list)
                or len(bbox) != 4
                or not all(isinstance(v, (int, float)) for v in bbox)
            ):
                raise DatasetError(f"{where}: bbox must be [x, y, width, height], got {bbox!r}")
            x, y, w, h = (float(v) for v in bbox)
            xyxy = [x, y, x + w, y + h]  # COCO boxes are already continuous 0-based pixels
            check_box(xyxy, where)
            size = sizes[order[ann["image_id"]]]
            if size is not None:
                check_inside(xyxy, *size, f"{where} of {files[order[ann['image_id']]]}")
            boxes, labels, difficult = per_image[order[ann["image_id"]]]
            boxes.append(xyxy)
            labels.append(cat_to_label[ann["category_id"]])
            difficult.append(bool(ann.get("iscrowd", 0)) or bool(ann.get("ignore", 0)))

        images = DirIndex()
        mismatched: list[str] = []
        losing: list[str] = []
        for (image_id, i), (boxes, labels, difficult) in zip(order.items(), per_image, strict=True):
            path = self.image_dir / files[i]
            if not images.exists(path):
                raise DatasetError(
                    f"{path}: image file missing (images[{i}] id {image_id} of {self.ann_file})"
                )
            if sizes[i] is not None:
                declared = sizes[i]
                raw = image_size(path, oriented=False)
                if declared not in (raw, raw[::-1]):
                    real = image_size(path)  # only now pay for EXIF (PNG decodes to reach it)
                    what = f"{files[i]} (declared {declared[0]:g}x{declared[1]:g}, real {real[0]}x{real[1]})"
                    mismatched.append(what)
                    if any(b[2] > real[0] + SIZE_SLACK or b[3] > real[1] + SIZE_SLACK for b in boxes):
                        losing.append(f"{path}: declared {declared[0]:g}x{declared[1]:g}, real {real[0]}x{real[1]}")
            self.records.append(make_record(path, image_id, boxes, labels, difficult))
        if losing:
            raise DatasetError(
                f"{losing[0]} in {self.ann_file}: annotation boxes reach beyond the real image "
                f"({len(losing)} image(s) like this); were the images resized after annotation? "
                "Fix images[].width/height and the boxes, or the images"
            )
        if mismatched:
            self.warnings.append(
                f"{self.ann_file}: images[].width/height differ from the real size of {len(mismatched)} "
                f"image(s), boxes kept as annotated: {first_few(mismatched)}"
            )
