"""Shared pieces of the dataset readers: image loading, one-line errors, the common Dataset base.

Every reader parses its annotations once at construction into a list of ``Record`` (numpy boxes, cheap to
pickle into DataLoader workers) and inherits ``__getitem__`` from ``DetectionDataset``; so the sample
contract (docs/architecture.md, Contracts) lives in one place. Problems worth telling but not fatal (stale VOC
``<filename>`` tags, COCO sizes that disagree with the images) go into ``DetectionDataset.warnings`` as
one-line messages; the engine logs them, the datasets never print.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from accel_det.errors import DatasetError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # the EXIF orientations that rotate by 90 degrees: width <-> height

Target = dict[str, Any]
Transforms = Callable[[tv_tensors.Image, Target], tuple[tv_tensors.Image, Target]]


def load_image(path: str | Path, channels: int = 3) -> tv_tensors.Image:
    """Read an image as uint8 CHW with EXIF orientation applied: RGB (channels=3) or L (channels=1)."""
    if channels not in (1, 3):
        raise DatasetError(f"{path}: cannot load images with {channels} channels (supported: 1, 3)")
    try:
        with Image.open(path) as img:
            # Phone photos store pixels unrotated plus an Orientation tag; annotations (and people) see the
            # rotated picture, so rotate before anything reads the size.
            img = ImageOps.exif_transpose(img)
            if img.mode.startswith("I"):
                img = _sixteen_to_eight_bit(img)
            elif img.mode == "F":
                img = _float_to_eight_bit(img, path)
            elif img.mode == "P":
                # Palette images with a transparent index warn when converted straight to RGB.
                img = img.convert("RGBA")
            img = img.convert("L" if channels == 1 else "RGB")  # gray/RGBA/CMYK/16-bit -> 8-bit L or RGB
    except DatasetError:
        raise  # already names the file; DataError is a ValueError, keep the clause below from rewording it
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file missing") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot read image: {exc}") from None
    return tv_tensors.Image(F.pil_to_tensor(img))


def _sixteen_to_eight_bit(img: Image.Image) -> Image.Image:
    """16-bit gray (PNG/TIFF from thermal or medical cameras; Pillow opens them as "I;16" or "I"):
    PIL's convert would clip everything above 255 to white, so scale the 16-bit range down instead."""
    pixels = np.asarray(img).astype(np.int64)
    if img.mode.startswith("I;16") or pixels.max(initial=0) > 255:
        pixels = pixels // 257
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "L")


def _float_to_eight_bit(img: Image.Image, path: str | Path) -> Image.Image:
    """32-bit float gray (mode "F": TIFFs from scientific cameras or exported by numpy pipelines): PIL's
    convert truncates values to 0..255, so a [0, 1] image turns black. Scale [0, 1] data, clip the rest."""
    pixels = np.asarray(img, dtype=np.float64)
    if not np.isfinite(pixels).all():
        raise DatasetError(f"{path}: float image has NaN or infinite pixel values")
    if pixels.max(initial=0.0) <= 1.0:
        pixels = pixels * 255.0
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "L")


def is_hidden(path: Path, root: Path) -> bool:
    """True when a part of ``path`` below ``root`` starts with "." (macOS ``._x.jpg`` AppleDouble files,
    ``.DS_Store``, ``.ipynb_checkpoints/``, ...): folder scans skip them. Outside ``root``, only the name
    counts."""
    try:
        parts = Path(path).relative_to(root).parts
    except ValueError:
        parts = (Path(path).name,)
    return any(part.startswith(".") and part not in (".", "..") for part in parts)


def image_size(path: Path, oriented: bool = True) -> tuple[int, int]:
    """(width, height) of an image from its header alone (no pixels decoded); ``oriented``: as ``load_image``
    returns it, i.e. swapped for EXIF orientations 5-8 (for some formats, e.g. PNG, reading EXIF decodes the
    image)."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            if oriented and img.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSED_ORIENTATIONS:
                w, h = h, w
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file missing") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot read image: {exc}") from None
    return int(w), int(h)


def first_few(items: Sequence[str], limit: int = 3) -> str:
    """``a, b, c and 4 more``: the head of a long list for a one-line message."""
    head = ", ".join(items[:limit])
    return f"{head} and {len(items) - limit} more" if len(items) > limit else head


def check_inside(values: Sequence[float], width: float, height: float, where: str) -> None:
    """Reject a box (continuous 0-based xyxy px) with no area inside the declared ``width`` x ``height``: it
    would be clamped to nothing at load time, silently losing the object. Partial overlaps are fine (clamped
    at load). The transposed size counts too: for EXIF-rotated photos, tools disagree on which one to declare."""
    x1, y1, x2, y2 = values

    def outside(w: float, h: float) -> bool:
        iw = min(x2, w) - max(x1, 0.0)
        ih = min(y2, h) - max(y1, 0.0)
        # a zero-area box on the border is merely degenerate (SanitizeBoundingBoxes drops it), not misplaced
        return iw < 0 or ih < 0 or (x2 > x1 and y2 > y1 and (iw == 0 or ih == 0))

    if outside(width, height) and outside(height, width):
        raise DatasetError(
            f"{where}: box x1={x1:g} y1={y1:g} x2={x2:g} y2={y2:g} lies wholly outside the declared "
            f"{width:g}x{height:g} image"
        )


class DirIndex:
    """``exists(path)`` from one cached ``os.listdir`` per folder: tens of thousands of ``stat`` calls on a
    network file system take minutes, one listing per folder takes milliseconds."""

    def __init__(self) -> None:
        self._cache: dict[Path, frozenset[str]] = {}
        self._by_stem: dict[Path, dict[str, list[str]]] = {}

    def _names(self, folder: Path) -> frozenset[str]:
        names = self._cache.get(folder)
        if names is None:
            try:
                names = frozenset(os.listdir(folder))
            except OSError:
                names = frozenset()
            self._cache[folder] = names
        return names

    def exists(self, path: Path) -> bool:
        return path.name in self._names(path.parent)

    def find_image(self, path: Path) -> Path | None:
        """The image ``path`` + any of ``IMAGE_SUFFIXES`` (suffix case-insensitive: ``a.JPG`` is found for
        ``a``), or None. Several matches: the first in ``IMAGE_SUFFIXES`` order, so the choice is stable."""
        folder = path.parent
        by_stem = self._by_stem.get(folder)
        if by_stem is None:
            by_stem = {}
            for name in sorted(self._names(folder)):
                stem, suffix = os.path.splitext(name)
                if suffix.lower() in IMAGE_SUFFIXES and not name.startswith("."):
                    by_stem.setdefault(stem, []).append(name)
            for names in by_stem.values():
                names.sort(key=lambda n: (IMAGE_SUFFIXES.index(os.path.splitext(n)[1].lower()), n))
            self._by_stem[folder] = by_stem
        names = by_stem.get(path.name)
        return folder / names[0] if names else None


def read_lines(path: Path, what: str) -> list[str]:
    """The lines of a split/list file, or a DatasetError naming the file."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DatasetError(f"{path}: {what} missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read {what}: {exc}") from None


def check_box(values: Sequence[float], where: str) -> None:
    """Reject non-finite values and inverted boxes (``values`` = x1, y1, x2, y2)."""
    if not all(math.isfinite(v) for v in values):
        raise DatasetError(f"{where}: box {list(values)} has a non-finite value")
    x1, y1, x2, y2 = values
    if x2 < x1 or y2 < y1:
        raise DatasetError(f"{where}: box x1={x1:g} y1={y1:g} x2={x2:g} y2={y2:g} has x2 < x1 or y2 < y1")


def class_list(class_names: Sequence[str]) -> str:
    return ", ".join(class_names)


@dataclass
class Record:
    """One image's annotation. ``boxes`` are xyxy in pixels, or in [0, 1] fractions of the image size when
    ``normalized`` (YOLO: the size is only known once the EXIF-rotated image is loaded)."""

    path: Path
    image_id: int
    boxes: np.ndarray  # (n, 4) float32
    labels: np.ndarray  # (n,) int64, 1..K
    difficult: np.ndarray  # (n,) bool
    normalized: bool = False


def make_record(
    path: Path,
    image_id: int,
    boxes: list[list[float]],
    labels: list[int],
    difficult: list[bool],
    normalized: bool = False,
) -> Record:
    return Record(
        path=path,
        image_id=image_id,
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.asarray(labels, dtype=np.int64).reshape(-1),
        difficult=np.asarray(difficult, dtype=bool).reshape(-1),
        normalized=normalized,
    )


class DetectionDataset(Dataset):
    """Base of the readers: subclasses fill ``records``, ``class_names`` and ``category_ids``."""

    def __init__(
        self,
        class_names: Sequence[str],
        transforms: Transforms | None,
        channels: int,
        keep_difficult: bool = True,
    ) -> None:
        if channels not in (1, 3):
            raise DatasetError(f"model.channels = {channels}: datasets load 1- or 3-channel images only")
        self.class_names: list[str] = list(class_names)
        self.category_ids: list[int] = []
        self.records: list[Record] = []
        self.transforms = transforms
        self.channels = channels
        # One-line messages about the data that do not stop training; the engine logs them once per run.
        self.warnings: list[str] = []
        # False drops difficult (VOC) / crowd (COCO) boxes: training on them teaches the model to fire on
        # things the evaluator ignores.
        self.keep_difficult = keep_difficult

    def __len__(self) -> int:
        return len(self.records)

    def image_path(self, idx: int) -> Path:
        return self.records[idx].path

    def num_objects(self) -> int:
        """Boxes a sample will carry: difficult/crowd ones only when kept, and only boxes with an area
        (zero-area boxes are dropped by the training transforms' SanitizeBoundingBoxes)."""
        total = 0
        for rec in self.records:
            boxes = rec.boxes if self.keep_difficult else rec.boxes[~rec.difficult]
            if rec.normalized:  # the clamp __getitem__ applies once the size is known
                boxes = boxes.clip(0.0, 1.0)
            total += int(((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).sum())
        return total

    def __getitem__(self, idx: int) -> tuple[tv_tensors.Image, Target]:
        try:
            return self._load(idx)
        except DatasetError as exc:
            # A sample is read by one process only (its shard): that process must report it, not rank 0.
            exc.local = True
            raise

    def _load(self, idx: int) -> tuple[tv_tensors.Image, Target]:
        rec = self.records[idx]
        image = load_image(rec.path, self.channels)
        h, w = image.shape[-2:]
        boxes, labels, difficult = rec.boxes, rec.labels, rec.difficult
        if not self.keep_difficult:
            keep = ~difficult
            boxes, labels, difficult = boxes[keep], labels[keep], difficult[keep]
        boxes = torch.from_numpy(boxes.copy())
        if rec.normalized:
            boxes *= torch.tensor([w, h, w, h], dtype=torch.float32)
        # Boxes partly outside the image are clamped; a box wholly outside becomes degenerate and the
        # training transforms' SanitizeBoundingBoxes drops it.
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        target: Target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
            "labels": torch.from_numpy(labels.copy()),
            "difficult": torch.from_numpy(difficult.copy()),
            "image_id": rec.image_id,
            "orig_size": (int(h), int(w)),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self)} images, {self.num_objects()} objects, "
            f"classes: {class_list(self.class_names)})"
        )
