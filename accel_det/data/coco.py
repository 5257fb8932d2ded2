"""COCO instances JSON, read with ``json`` alone (pycocotools is the evaluator's business, not the loader's).

Category ids are whatever the file says (COCO's own run 1..90 with holes); labels are 1..K in
``class_names`` order, found by category *name*, and ``category_ids[label - 1]`` maps back for the
evaluator. ``iscrowd=1`` (and ``ignore=1``, as in CrowdHuman-style files) become ``difficult``.

Sizes. Where ``images[].width/height`` are given, a box wholly outside them is an error, and they are checked
against each image's real size (a header read, no decoding; either orientation matches, as EXIF rotation
swaps them): images resized after annotation keep full-size boxes that the loader would clamp away. A
mismatch is a warning in ``warnings``; an error when an annotation box reaches beyond the real image.

Bad entries (``on_bad_sample`` "skip"/"blank"; "error" raises the first). Dropped with their annotations: an
image entry without an integer ``id`` or a ``file_name``, every entry of an image id listed twice (its
annotations cannot be told apart), an image file that is missing or unreadable, an image whose boxes reach
beyond its real size. Dropped alone: an annotation of an image id the file does not list, and an annotation
whose own box is wrong (malformed, inverted, wholly outside the declared size) -- the image's other boxes
are still right. Categories named in neither ``class_names`` nor ``ignore_classes`` stop the run, all listed
in one error with their annotation counts; so do annotations of category ids ``categories`` does not declare.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import (
    ANNOTATION_DROPPED,
    IMAGE_DROPPED,
    OBJECT_DROPPED,
    BadEntry,
    DatasetError,
    DirIndex,
    UnknownNames,
    check_box,
    check_inside,
    fatal,
    first_few,
    make_record,
)
from .dataset import DetectionDataset, OnBadSample, StagedTransforms, Transforms
from .images import image_size

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


def _categories(
    path: Path, categories: list[Any], class_names: list[str], ignore: frozenset[str]
) -> tuple[dict[int, int], dict[int, str], dict[int, str]]:
    """(category id -> label 1..K, ignored id -> name, unknown id -> name), matched by name. Every class
    name needs a category; a category in neither ``class_names`` nor ``ignore`` is unknown."""
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
        by_name[cat["name"]] = cat["id"]
    missing = [n for n in class_names if n not in by_name]
    if missing:
        raise fatal("unknown_class", path, f"{path}: no category for class name(s) {', '.join(map(repr, missing))}")
    labels = {by_name[name]: i + 1 for i, name in enumerate(class_names)}
    ignored = {cid: name for name, cid in by_name.items() if name in ignore}
    unknown = {cid: name for name, cid in by_name.items() if cid not in labels and cid not in ignored}
    return labels, ignored, unknown


def _declared_size(img: dict[str, Any]) -> tuple[float, float] | None:
    """images[].(width, height), or None when either is missing or not a positive number (no check then)."""
    w, h = img.get("width"), img.get("height")
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf") for v in (w, h))
    return (float(w), float(h)) if ok else None


class COCODetection(DetectionDataset):
    """One COCO split: ``ann_file`` (instances JSON) and the folder its ``file_name``s are relative to.

    Images without annotations are kept (empty targets): they are valid negatives and the evaluator must
    see every image. ``keep_crowd=False`` (training, as in torchvision's references) drops crowd boxes.
    ``on_bad_sample``, ``ignore_classes``, ``seed``: see ``DetectionDataset``."""

    def __init__(
        self,
        ann_file: str | Path,
        image_dir: str | Path,
        class_names: Sequence[str],
        transforms: Transforms | StagedTransforms | None = None,
        channels: int = 3,
        keep_crowd: bool = True,
        *,
        on_bad_sample: OnBadSample = "error",
        ignore_classes: Sequence[str] = (),
        seed: int = 0,
    ) -> None:
        super().__init__(
            class_names, transforms, channels, keep_difficult=keep_crowd,
            on_bad_sample=on_bad_sample, ignore_classes=ignore_classes, seed=seed,
        )  # fmt: skip
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        data = _load_json(self.ann_file)
        cat_to_label, ignored, unknown = _categories(
            self.ann_file, data["categories"], self.class_names, self.ignore_classes
        )
        self.category_ids = sorted(cat_to_label, key=cat_to_label.__getitem__)
        for name in unknown.values():
            self.unknown.add(name, "", count=0)  # listed even when no annotation uses it
        if not data["images"]:
            raise fatal("no_usable_images", self.ann_file, f"{self.ann_file}: no images")
        entries, dropped_ids = self._image_entries(data["images"])

        undeclared = UnknownNames()
        per_image: dict[int, tuple[list[list[float]], list[int], list[bool]]] = {k: ([], [], []) for k in entries}
        for i, ann in enumerate(data.get("annotations") or []):
            where = (
                f"{self.ann_file}: annotation {i} (id {ann.get('id', '?') if isinstance(ann, dict) else '?'})"
            )
            try:
                if not isinstance(ann, dict):
                    raise BadEntry("malformed_annotation", self.ann_file, f"{where}: not an object")
                image_id, cid = ann.get("image_id"), ann.get("category_id")
                if isinstance(image_id, int) and image_id in dropped_ids:
                    continue  # its image was dropped, and that drop recorded
                if not isinstance(image_id, int) or image_id not in entries:
                    raise BadEntry("orphan_annotation", self.ann_file, f"{where}: unknown image_id {image_id!r}")
                file_name = entries[image_id][1]
                if isinstance(cid, int) and cid in ignored:
                    self.note("ignored_class", self.ann_file, f"annotation {i} of {file_name}: class "
                              f"{ignored[cid]!r}", OBJECT_DROPPED)  # fmt: skip
                    continue
                if isinstance(cid, int) and cid in unknown:
                    self.unknown.add(unknown[cid], file_name)
                    continue
                if not isinstance(cid, int) or cid not in cat_to_label:
                    undeclared.add(repr(cid), file_name)
                    continue
                xyxy = self._box(ann.get("bbox"), where, entries[image_id][2], file_name)
            except BadEntry as exc:
                # an annotation of no known image, or not even an object, has no object to speak of
                orphan = exc.kind == "orphan_annotation" or not isinstance(ann, dict)
                self.drop(exc, ANNOTATION_DROPPED if orphan else OBJECT_DROPPED)
                continue
            boxes, labels, difficult = per_image[image_id]
            boxes.append(xyxy)
            labels.append(cat_to_label[cid])
            difficult.append(bool(ann.get("iscrowd", 0)) or bool(ann.get("ignore", 0)))
        undeclared.check(
            self.ann_file,
            "annotations of category ids that 'categories' does not declare:",
            "declare them in 'categories' (with their names) or fix the annotations",
        )
        self._check_images(entries, per_image)
        self.finish_index(
            self.ann_file,
            "unknown class names",
            "add them to data.class_names or data.ignore_classes",
            own_lines=("size_differs",),
        )

    def _image_entries(
        self, images: list[Any]
    ) -> tuple[dict[int, tuple[int, str, tuple[float, float] | None]], set[int]]:
        """({image id: (index in images, file_name, declared size)}, ids of the entries dropped)."""
        entries: dict[int, tuple[int, str, tuple[float, float] | None]] = {}
        dropped: set[int] = set()
        for i, img in enumerate(images):
            image_id = img.get("id") if isinstance(img, dict) else None
            try:
                if not isinstance(image_id, int) or not img.get("file_name"):
                    raise BadEntry(
                        "malformed_annotation",
                        self.ann_file,
                        f"{self.ann_file}: images[{i}]: needs an integer 'id' and a 'file_name'",
                    )
                if image_id in entries or image_id in dropped:
                    raise BadEntry(
                        "duplicate_image_id",
                        self.ann_file,
                        f"{self.ann_file}: images[{i}]: duplicate image id {image_id}",
                    )
            except BadEntry as exc:
                self.drop(exc, IMAGE_DROPPED)
                if isinstance(image_id, int):
                    dropped.add(image_id)
                    first = entries.pop(image_id, None)
                    if first is not None and exc.kind == "duplicate_image_id":
                        # which entry the annotations of this id belong to is anyone's guess: drop both
                        self.note("duplicate_image_id", self.ann_file,
                                  f"images[{first[0]}]: image id {image_id} listed again in images[{i}]",
                                  IMAGE_DROPPED)  # fmt: skip
                continue
            entries[image_id] = (i, str(img["file_name"]), _declared_size(img))
        return entries, dropped

    def _box(self, bbox: Any, where: str, size: tuple[float, float] | None, file_name: str) -> list[float]:
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
            raise BadEntry(
                "malformed_annotation", self.ann_file, f"{where}: bbox must be [x, y, width, height], got {bbox!r}"
            )
        x, y, w, h = (float(v) for v in bbox)
        xyxy = [x, y, x + w, y + h]  # COCO boxes are already continuous 0-based pixels
        check_box(xyxy, where, self.ann_file)
        if size is not None:
            check_inside(xyxy, *size, f"{where} of {file_name}", self.ann_file)
        return xyxy

    def _check_images(
        self,
        entries: dict[int, tuple[int, str, tuple[float, float] | None]],
        per_image: dict[int, tuple[list[list[float]], list[int], list[bool]]],
    ) -> None:
        """Records of the image files that exist, are readable and fit their boxes (see the module docstring)."""
        images = DirIndex()
        mismatched: list[str] = []
        losing: list[str] = []
        for image_id, (i, file_name, declared) in entries.items():
            path = self.image_dir / file_name
            boxes, labels, difficult = per_image[image_id]
            try:
                if not images.exists(path):
                    raise BadEntry(
                        "missing_image",
                        path,
                        f"{path}: image file missing (images[{i}] id {image_id} of {self.ann_file})",
                    )
                if declared is not None and self._loses_boxes(path, file_name, declared, boxes, mismatched, losing):
                    continue
            except BadEntry as exc:
                self.drop(exc, IMAGE_DROPPED)
                continue
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

    def _loses_boxes(
        self,
        path: Path,
        file_name: str,
        declared: tuple[float, float],
        boxes: list[list[float]],
        mismatched: list[str],
        losing: list[str],
    ) -> bool:
        """Compare ``declared`` with the real size: a mismatch is noted in ``mismatched``; boxes reaching beyond
        the real image drop the image ("skip"/"blank") or go to ``losing`` for one error ("error"). True: the
        image is left out."""
        try:
            raw = image_size(path, oriented=False)
            if declared in (raw, raw[::-1]):
                return False
            real = image_size(path)  # only now pay for EXIF (PNG decodes to reach it)
        except DatasetError as exc:
            raise BadEntry("unreadable_image", path, str(exc)) from None
        sizes = f"declared {declared[0]:g}x{declared[1]:g}, real {real[0]}x{real[1]}"
        if not any(b[2] > real[0] + SIZE_SLACK or b[3] > real[1] + SIZE_SLACK for b in boxes):
            mismatched.append(f"{file_name} ({sizes})")
            self.note("size_differs", path, sizes, "boxes kept as annotated")
            return False
        if self.on_bad_sample == "error":
            losing.append(f"{path}: {sizes}")  # raised once, for all such images, after the scan
            return True
        message = f"{path}: {sizes}: annotation boxes reach beyond the real image"
        self.drop(BadEntry("size_mismatch", path, message), IMAGE_DROPPED)
        return True
