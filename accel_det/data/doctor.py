"""The data doctor's scan (``accel-det check-data``): every split of a recipe indexed the way training indexes
it, every image fully decoded, and what training would do about each problem, grouped. Pure data: printing
is check_data.py's business.

Indexing goes through ``build_dataset`` (the one place that knows which recipe key feeds which reader) on a
copy of the recipe with ``data.on_bad_sample = "skip"``: the readers then record every per-image and
per-object problem as a ``Problem`` instead of raising the first. On val that becomes "blank", which indexes
exactly like "skip"; the doctor never loads samples through the dataset, so blank images never appear.
What is fatal for a whole split (a ``DatasetError`` from the reader) is one fatal finding; the other split is
still scanned. With ``data.on_bad_sample = "error"`` in the real recipe, every drop becomes fatal too: that
is what the run would do with it.

Decoding uses ``load_image``, the very function training loads samples with, so "readable" means what the
DataLoader will see (a truncated JPEG passes a header read and fails here, as it would mid-epoch).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from accel_det.config import Recipe
from accel_det.errors import DataError

from .builder import build_dataset
from .common import ANNOTATION_DROPPED, IMAGE_DROPPED, OBJECT_DROPPED, PROBLEM_KINDS
from .dataset import DetectionDataset
from .doctor_images import ImageCheck, Progress, decode_all, default_workers, make_pool

Severity = Literal["fatal", "skipped", "fixed", "info"]
SEVERITIES: tuple[Severity, ...] = ("fatal", "skipped", "fixed", "info")
# with [data.mix], "train" holds both training sets (build_dataset's MixedDataset) and "val2" is the second val
Split = Literal["train", "val", "val2"]
SPLITS: tuple[Split, ...] = ("train", "val", "val2")

# Every kind a finding can have, in table order within a severity: fatal split problems, the readers' kinds
# (common.PROBLEM_KINDS), then what only decoding finds.
KINDS: dict[str, str] = {
    "split_unreadable": "split list or annotation file missing or unreadable",
    "unknown_class": "class names / category ids that do not match data.class_names",
    "pixel_coordinates": "YOLO coordinates in pixels, not normalised",
    "no_usable_images": "no usable image in the split",
    "no_readable_images": "no image of the split decodes",
    "no_objects": "no objects in the split",
    **PROBLEM_KINDS,
    "degenerate_box": "box with no area inside the image (zero size, or outside the real image)",
    "box_clipped": "box partly outside the real image",
    "empty_image": "image without objects",
    "exif_rotated": "EXIF-rotated image",
    "mode_converted": "image mode converted",
    "annotation_id_zero": "COCO annotation id 0 (pycocotools treats id 0 as 'unmatched')",
}

STOPS = "stops the run"
REPLACED = "sample replaced"
LEFT_OUT = "left out of eval"
BOX_DROPPED = "box dropped"
UNMATCHABLE = "kept as ground truth, never matched"
SEVERITY_OF: dict[str, Severity] = {
    STOPS: "fatal",
    IMAGE_DROPPED: "skipped",
    OBJECT_DROPPED: "skipped",
    ANNOTATION_DROPPED: "skipped",
    REPLACED: "skipped",
    LEFT_OUT: "skipped",
    BOX_DROPPED: "skipped",
    "box clipped": "fixed",
    "converted": "fixed",
    "rotated": "fixed",
}  # anything else ("kept as negative", the readers' notes, ...) loses nothing: info
# reader problems that are ``note``s, never ``drop``s: not fatal even with on_bad_sample = "error"
NOTED_KINDS = frozenset({"ignored_class", "stale_filename", "size_differs"})
# What a fatal DatasetError says, until the readers tag it with a kind of their own (``exc.kind``).
CLIP_SLACK = 1e-3  # px: float32 rounding of normalised boxes is not "outside the image"


@dataclass(frozen=True)
class Occurrence:
    """One problem with one file (or one box of it). ``tag`` sub-groups a kind in its description."""

    split: str
    kind: str
    action: str
    file: str
    detail: str
    tag: str = ""


@dataclass
class Finding:
    """All occurrences of one kind in one split that training treats the same way."""

    split: str
    kind: str
    severity: Severity
    action: str
    description: str
    files: list[str]  # distinct, in scan order
    details: list[str]  # one line per occurrence: "file: what"

    @property
    def count(self) -> int:
        return len(self.details)

    def to_json(self) -> dict[str, Any]:
        return {"split": self.split, "kind": self.kind, "description": self.description,
                "severity": self.severity, "action": self.action, "count": self.count,
                "files": self.files, "details": self.details}  # fmt: skip


@dataclass
class SplitReport:
    """One split: ``images`` indexed (after the readers' drops), ``readable`` of them, ``objects`` that
    training can use (non-degenerate boxes in readable images), and how many findings of each severity."""

    name: str
    format: str
    source: str
    images: int = 0
    readable: int = 0
    objects: int = 0
    severities: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SEVERITIES, 0))

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "source": self.source, "images": self.images, "readable": self.readable,
                "objects": self.objects, "findings": dict(self.severities)}  # fmt: skip


@dataclass
class DoctorReport:
    splits: dict[str, SplitReport]
    findings: list[Finding]
    on_bad_sample: str

    @property
    def can_train(self) -> bool:
        return not any(f.severity == "fatal" for f in self.findings)

    def counts(self) -> dict[str, int]:
        """Occurrences per severity, over both splits."""
        counts = dict.fromkeys(SEVERITIES, 0)
        for f in self.findings:
            counts[f.severity] += f.count
        return counts

    def to_json(self, recipe: str = "") -> dict[str, Any]:
        return {"recipe": recipe, "can_train": self.can_train, "on_bad_sample": self.on_bad_sample,
                "splits": {name: s.to_json() for name, s in self.splits.items()},
                "findings": [f.to_json() for f in self.findings], "counts": self.counts()}  # fmt: skip


def check_data(recipe: Recipe, workers: int | None = None, progress: Progress | None = None) -> DoctorReport:
    """Scan train and val of ``recipe`` (see the module docstring). ``workers``: decoding processes (default
    ``default_workers()``; 0 or 1 decode in this process); ``progress(split, done, total)`` after each image."""
    data = recipe.data
    lenient = recipe.model_copy(update={"data": data.model_copy(update={"on_bad_sample": "skip"})})
    strict = data.on_bad_sample == "error"
    found: list[Occurrence] = []
    splits: dict[str, SplitReport] = {}
    datasets: dict[str, DetectionDataset] = {}
    for split in SPLITS:
        if split == "val2" and data.mix is None:
            continue
        table: Any = data.mix if split == "val2" else data
        where = table.train if split == "train" else table.val
        splits[split] = SplitReport(split, table.format, str(Path(table.root) / where))
        try:
            ds = build_dataset(lenient, split)
        except DataError as exc:
            found.append(_fatal(split, exc))
            ds = _without_unknown_classes(lenient, split, exc)
            if ds is None:
                continue
        datasets[split] = ds
        splits[split].source, splits[split].images = ds.source, len(ds)
        found += _reader_occurrences(split, ds, strict)
        found += _annotation_id_zero(split, ds)
    workers = default_workers() if workers is None else workers
    total = sum(len(ds) for ds in datasets.values())
    workers = min(workers, total)
    pool = make_pool(workers) if workers > 1 else None
    try:
        for split, ds in datasets.items():
            paths = [str(rec.path) if rec.image is None else rec.image for rec in ds.records]
            checks = decode_all(pool, workers, paths, recipe.model.channels, split, progress)
            found += _image_occurrences(split, ds, checks, splits[split], strict)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)  # Ctrl-C: do not decode the rest first
    found += _split_verdicts(datasets, splits)
    findings = _group(found)
    for f in findings:
        splits[f.split].severities[f.severity] += f.count
    return DoctorReport(splits, findings, data.on_bad_sample)


def _without_unknown_classes(recipe: Recipe, split: str, exc: DataError) -> DetectionDataset | None:
    """After an unknown-class error, the split read again with those names ignored: one unknown name must not
    hide every other problem of the split. None when that is not possible (YOLO ids, other errors)."""
    names = getattr(exc, "names", None)
    if getattr(exc, "kind", None) != "unknown_class" or not names or recipe.data.format == "yolo":
        return None
    data = recipe.data.model_copy(update={"ignore_classes": [*recipe.data.ignore_classes, *map(str, names)]})
    try:
        return build_dataset(recipe.model_copy(update={"data": data}), split)
    except DataError:
        return None


def _fatal(split: str, exc: DataError) -> Occurrence:
    message = str(exc)
    # the readers tag what makes a whole split unusable (common.fatal); anything else stopped the reading itself
    kind = getattr(exc, "kind", None)
    if kind not in KINDS:
        kind = "split_unreadable"
    file = getattr(exc, "file", None) or message.split(": ", 1)[0]
    detail = message.removeprefix(f"{file}: ") if message.startswith(f"{file}: ") else message
    return Occurrence(split, kind, STOPS, str(file), detail)


def _reader_occurrences(split: str, ds: DetectionDataset, strict: bool) -> list[Occurrence]:
    out = []
    for p in ds.problems:
        stops = strict and p.kind not in NOTED_KINDS and p.action in (IMAGE_DROPPED, OBJECT_DROPPED, ANNOTATION_DROPPED)
        out.append(Occurrence(split, p.kind, STOPS if stops else p.action, p.file, p.detail))
    return out


def _annotation_id_zero(split: str, ds: DetectionDataset) -> list[Occurrence]:
    """COCO annotations whose id is 0. The reader has parsed the JSON and dropped it; reading it again costs
    what the reader's parse did (seconds for COCO train), acceptable for a one-off scan."""
    ann_file = getattr(ds, "ann_file", None)
    if ann_file is None:
        return []
    with open(ann_file, encoding="utf-8") as f:
        annotations = json.load(f).get("annotations") or []
    return [
        Occurrence(split, "annotation_id_zero", "renumbered by accel_det", str(ann_file),
                   f"annotation {i} (image_id {ann.get('image_id')!r}) has id 0")
        for i, ann in enumerate(annotations)
        if isinstance(ann, dict) and ann.get("id") == 0 and not isinstance(ann.get("id"), bool)
    ]


def _image_occurrences(
    split: str, ds: DetectionDataset, checks: Sequence[ImageCheck], report: SplitReport, strict: bool
) -> list[Occurrence]:
    train = split == "train"
    target = "L" if ds.channels == 1 else "RGB"
    out: list[Occurrence] = []
    for rec, check in zip(ds.records, checks, strict=True):
        file = str(rec.path)
        if check.error is not None:
            action = STOPS if strict else (REPLACED if train else LEFT_OUT)
            out.append(Occurrence(split, "unreadable_image", action, file, check.error.removeprefix(f"{file}: ")))
            continue
        report.readable += 1
        if check.orientation in range(2, 9):
            out.append(Occurrence(split, "exif_rotated", "rotated", file, f"EXIF orientation {check.orientation}"))
        if check.mode != target:
            out.append(Occurrence(split, "mode_converted", "converted", file,
                                  f"mode {check.mode} converted to {target}", tag=check.mode))  # fmt: skip
        boxes, labels = rec.boxes, rec.labels
        if not ds.keep_difficult:  # what the sample will carry (dataset._load)
            boxes, labels = boxes[~rec.difficult], labels[~rec.difficult]
        kept, box_out = _check_boxes(split, ds, file, boxes, labels, rec.normalized, check)
        out += box_out
        report.objects += kept
        if (kept if train else len(boxes)) == 0:
            why = f"{len(boxes)} box(es), none with an area" if len(boxes) else "no objects"
            out.append(Occurrence(split, "empty_image", "kept as negative", file, why))
    return out


def _check_boxes(
    split: str, ds: DetectionDataset, file: str, boxes: np.ndarray, labels: np.ndarray, normalized: bool,
    check: ImageCheck,
) -> tuple[int, list[Occurrence]]:
    """(boxes with an area inside the decoded image, occurrences for the clipped and degenerate ones)."""
    w, h = check.width, check.height
    px = boxes * np.array([w, h, w, h], dtype=np.float32) if normalized else boxes
    out: list[Occurrence] = []
    kept = 0
    for (x1, y1, x2, y2), label in zip(px.tolist(), labels.tolist(), strict=True):
        name = ds.class_names[label - 1] if 0 < label <= len(ds.class_names) else str(label)
        where = f"{name} box x1={x1:g} y1={y1:g} x2={x2:g} y2={y2:g}"
        cx1, cy1, cx2, cy2 = max(x1, 0.0), max(y1, 0.0), min(x2, w), min(y2, h)
        if cx2 <= cx1 or cy2 <= cy1:
            why = "has zero size" if x2 <= x1 or y2 <= y1 else f"lies outside the real {w}x{h} image"
            # val keeps every ground-truth box (transforms.py): a degenerate one is an object never found
            action = BOX_DROPPED if split == "train" else UNMATCHABLE
            out.append(Occurrence(split, "degenerate_box", action, file, f"{where} {why}"))
            continue
        kept += 1
        if x1 < -CLIP_SLACK or y1 < -CLIP_SLACK or x2 > w + CLIP_SLACK or y2 > h + CLIP_SLACK:
            out.append(Occurrence(split, "box_clipped", "box clipped", file, f"{where} clipped to the {w}x{h} image"))
    return kept, out


def _split_verdicts(datasets: dict[str, DetectionDataset], splits: dict[str, SplitReport]) -> list[Occurrence]:
    """What stops a run, or costs the metric, only once the whole split is seen."""
    out = []
    train = splits["train"]
    if "train" in datasets:
        if train.readable == 0:
            out.append(Occurrence("train", "no_readable_images", STOPS, train.source,
                                  f"none of the {train.images} images decodes"))  # fmt: skip
        elif train.objects == 0:
            out.append(Occurrence("train", "no_objects", STOPS, train.source,
                                  f"no object to learn from in {train.readable} readable images"))  # fmt: skip
    val = splits["val"]
    if "val" in datasets and val.objects == 0:
        out.append(Occurrence("val", "no_objects", "no mAP can be computed", val.source,
                              f"no object in {val.readable} readable images"))  # fmt: skip
    return out


def _group(found: list[Occurrence]) -> list[Finding]:
    """One finding per (split, kind, action), fatal first, then in ``KINDS`` order, train before val."""
    groups: dict[tuple[str, str, str], list[Occurrence]] = {}
    for o in found:
        groups.setdefault((o.split, o.kind, o.action), []).append(o)
    findings = []
    for (split, kind, action), occ in groups.items():
        severity: Severity = "info" if kind == "ignored_class" else SEVERITY_OF.get(action, "info")
        if action == STOPS:
            severity = "fatal"
        description = KINDS.get(kind, kind)
        tags = Counter(o.tag for o in occ if o.tag)
        if tags:
            description += " (" + ", ".join(f"{t}: {n}" for t, n in tags.items()) + ")"
        files = list(dict.fromkeys(o.file for o in occ))
        details = [f"{o.file}: {o.detail}" for o in occ]
        findings.append(Finding(split, kind, severity, action, description, files, details))
    kind_order = {k: i for i, k in enumerate(KINDS)}
    findings.sort(key=lambda f: (SEVERITIES.index(f.severity), kind_order.get(f.kind, len(kind_order)),
                                 SPLITS.index(f.split), f.action))  # fmt: skip
    return findings
