"""Shared pieces of the dataset readers: folder listings, box checks, the ``Record`` of one image, and the
``Problem`` list a reader keeps of what it dropped.

Every reader parses its annotations once at construction into a list of ``Record`` (numpy boxes, cheap to
pickle into DataLoader workers) and inherits ``__getitem__`` from ``DetectionDataset`` (dataset.py); so the
sample contract (docs/architecture.md, Contracts) lives in one place.

Problems at index time. A problem confined to one image or one object (a missing image, a malformed XML, an
inverted box, ...) is raised by the parsers as ``BadEntry``: in ``on_bad_sample = "error"`` mode it stops the
run as the first problem always did; otherwise the reader drops the image or the object and records a
``Problem``. What makes a whole split unusable (a missing split file or instances JSON, no usable image, YOLO
pixel coordinates, class names the recipe does not know) stays a plain ``DatasetError`` in every mode.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from accel_det.errors import DatasetError

if TYPE_CHECKING:
    from .images import EmbeddedImage

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# The kinds of ``Problem`` and how the summary line names them. A data doctor groups by these keys: add a
# kind here (and to the readers) rather than reusing one for something else.
PROBLEM_KINDS: dict[str, str] = {
    "missing_image": "image file missing",
    "unreadable_image": "image file cannot be read",
    "missing_annotation": "annotation file missing",
    "malformed_annotation": "malformed annotation",
    "invalid_box": "invalid box (inverted, negative size or non-finite)",
    "box_outside": "box wholly outside the declared image size",
    "duplicate_image_id": "image id listed more than once",
    "orphan_annotation": "annotation of an image id the file does not list",
    "size_mismatch": "annotation boxes reach beyond the real image (resized after annotation?)",
    "ignored_class": "object of a class in data.ignore_classes",
    # informational, never fatal; the readers write their own summary lines for these
    "stale_filename": "<filename> names another image than the one of the id",
    "size_differs": "declared width/height differ from the real image",
}
IMAGE_DROPPED = "image dropped"
OBJECT_DROPPED = "object dropped"
ANNOTATION_DROPPED = "annotation dropped"


@dataclass(frozen=True)
class Problem:
    """One thing a reader found wrong with the data, and what it did about it.

    ``kind`` is a key of ``PROBLEM_KINDS``; ``file`` the file at fault (annotation file, label file, image or
    instances JSON); ``detail`` where in it and what (one line); ``action`` what the reader did:
    "image dropped", "object dropped", "annotation dropped", or for the informational kinds what it used."""

    kind: str
    file: str
    detail: str
    action: str

    def line(self) -> str:
        return f"{self.file}: {self.detail}"


class BadEntry(DatasetError):
    """A problem confined to one image or object: fatal in "error" mode (its message is the error line
    readers always raised), a ``Problem`` otherwise."""

    def __init__(self, kind: str, file: str | Path, message: str) -> None:
        assert kind in PROBLEM_KINDS, kind
        super().__init__(message)
        self.kind = kind
        self.file = str(file)
        # the message without the leading file name, which Problem.file holds
        rest = message.removeprefix(self.file)
        self.detail = rest.removeprefix(":").strip() if rest != message else message

    def problem(self, action: str) -> Problem:
        return Problem(self.kind, self.file, self.detail, action)


def summarize(problems: Sequence[Problem], source: str | Path, skip: Sequence[str] = ()) -> list[str]:
    """One log line per problem kind (except ``skip``): count, what was done, and the first few problems."""
    lines = []
    for kind, description in PROBLEM_KINDS.items():
        group = [p for p in problems if p.kind == kind]
        if not group or kind in skip:
            continue
        actions: dict[str, int] = {}
        for p in group:
            actions[p.action] = actions.get(p.action, 0) + 1
        done = next(iter(actions)) if len(actions) == 1 else ", ".join(f"{a}: {n}" for a, n in actions.items())
        lines.append(f"{source}: {len(group)} x {description} ({done}): {first_few([p.line() for p in group], 2)}")
    return lines


def fatal(kind: str, file: str | Path, message: str) -> DatasetError:
    """A problem that makes a whole split unusable (``kind``: unknown_class, pixel_coordinates,
    no_usable_images), tagged with its kind and file so the data doctor can group it without parsing text."""
    error = DatasetError(message)
    error.kind, error.file = kind, str(file)
    return error


class UnknownNames:
    """Class names (or ids) an annotation uses that the recipe does not know, counted over a whole split so
    one error can list them all: fixing one name per run, on a big dataset, takes a day."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.first: dict[str, str] = {}

    def add(self, name: str, where: str | Path, count: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + count
        if count:
            self.first.setdefault(name, str(where))

    def check(self, source: str | Path, what: str, hint: str) -> None:
        """Raise one DatasetError listing every name with its count and first file (none: return)."""
        if not self.counts:
            return
        listed = ", ".join(
            f"{name} ({n}, first in {self.first[name]})" if name in self.first else f"{name} ({n})"
            for name, n in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))
        )
        error = fatal("unknown_class", source, f"{source}: {what} {listed}; {hint}")
        error.names = list(self.counts)  # the data doctor scans again with them ignored
        raise error


def is_hidden(path: Path, root: Path) -> bool:
    """True when a part of ``path`` below ``root`` starts with "." (macOS ``._x.jpg`` AppleDouble files,
    ``.DS_Store``, ``.ipynb_checkpoints/``, ...): folder scans skip them. Outside ``root``, only the name
    counts."""
    try:
        parts = Path(path).relative_to(root).parts
    except ValueError:
        parts = (Path(path).name,)
    return any(part.startswith(".") and part not in (".", "..") for part in parts)


def first_few(items: Sequence[str], limit: int = 3) -> str:
    """``a, b, c and 4 more``: the head of a long list for a one-line message."""
    head = ", ".join(items[:limit])
    return f"{head} and {len(items) - limit} more" if len(items) > limit else head


def check_inside(values: Sequence[float], width: float, height: float, where: str, file: str | Path) -> None:
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
        raise BadEntry(
            "box_outside",
            file,
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


def check_box(values: Sequence[float], where: str, file: str | Path) -> None:
    """Reject non-finite values and inverted boxes (``values`` = x1, y1, x2, y2)."""
    if not all(math.isfinite(v) for v in values):
        raise BadEntry("invalid_box", file, f"{where}: box {list(values)} has a non-finite value")
    x1, y1, x2, y2 = values
    if x2 < x1 or y2 < y1:
        raise BadEntry(
            "invalid_box", file, f"{where}: box x1={x1:g} y1={y1:g} x2={x2:g} y2={y2:g} has x2 < x1 or y2 < y1"
        )


def class_list(class_names: Sequence[str]) -> str:
    return ", ".join(class_names)


@dataclass
class Record:
    """One image's annotation. ``boxes`` are xyxy in pixels, or in [0, 1] fractions of the image size when
    ``normalized`` (YOLO: the size is only known once the EXIF-rotated image is loaded). ``image``: where the
    pixels are when they are not the file ``path`` (a row of a Hugging Face dataset; ``path`` then only names
    it in messages)."""

    path: Path
    image_id: int
    boxes: np.ndarray  # (n, 4) float32
    labels: np.ndarray  # (n,) int64, 1..K
    difficult: np.ndarray  # (n,) bool
    normalized: bool = False
    image: EmbeddedImage | None = None


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
