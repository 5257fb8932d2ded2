"""COCO bbox metric over gathered per-image records, on faster-coco-eval or pycocotools.

The trainer hands the main process plain records (numpy only, no torch). They are flattened once into
arrays; the ground truth side is indexed once per val set and kept in a small cache (training scores the
same val set every ``eval.freq`` epochs), keyed on a hash of the gt arrays and the class names.

* faster-coco-eval: its C++ evaluate+accumulate (``COCOevalEvaluateAccumulate``) is fed straight from the
  arrays: minimal annotation dicts grouped per (image, class) and, per pair that has both, the IoU matrix
  from its own ``mask.iou``. Its Python layers (``COCO`` index, ``loadRes``, ``_prepare``, the per-pair
  dicts of ``evaluate``) are skipped: at COCO size they took longer than the C++ part. A faster-coco-eval
  without those entry points runs its public ``COCOeval_faster`` instead.
* pycocotools: the reference, run as published (``COCO`` objects, ``loadRes``, ``COCOeval``), its gt
  ``COCO`` taken from the cache.

The 12 summary numbers are computed here from ``eval["precision"]``/``eval["recall"]`` rather than by the
backends' ``summarize()``: pycocotools hard-codes ``maxDets=100`` for the headline AP (it returns -1 for any
other ``max_det``) and both print. On the default setting our numbers equal their ``stats`` exactly
(tests/test_metrics.py checks it, and that both backends give the same precision arrays).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import hashlib
import io
import json
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

BACKENDS = ("faster_coco_eval", "pycocotools")
Record = Mapping[str, Any]
GT_CACHE_SIZE = 4  # val sets whose gt index is kept (val and val2 of [data.mix], with room to spare)


# ---------------------------------------------------------------------------------------------------------
# Records


def check_records(records: Sequence[Record], num_classes: int) -> list[dict[str, Any]]:
    """Normalise records to numpy arrays of fixed shapes and dtypes; a malformed one raises ValueError.

    Labels outside 1..K are an error rather than being dropped: ``category_ids[label - 1]`` would silently
    map label 0 to the last class.
    """
    out: list[dict[str, Any]] = []
    seen: set[int] = set()
    for rec in records:
        image_id = int(rec["image_id"])
        if image_id in seen:
            raise ValueError(f"image_id {image_id} appears twice (records must be deduplicated)")
        seen.add(image_id)
        gt_boxes = np.asarray(rec["gt_boxes"], dtype=np.float64).reshape(-1, 4)
        gt_labels = np.asarray(rec["gt_labels"], dtype=np.int64).reshape(-1)
        gt_ignore = np.asarray(rec.get("gt_ignore", np.zeros(len(gt_labels), bool)), dtype=bool).reshape(-1)
        boxes = np.asarray(rec["boxes"], dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(rec["scores"], dtype=np.float64).reshape(-1)
        labels = np.asarray(rec["labels"], dtype=np.int64).reshape(-1)
        if not (len(gt_boxes) == len(gt_labels) == len(gt_ignore)):
            raise ValueError(f"image_id {image_id}: gt_boxes/gt_labels/gt_ignore lengths differ")
        if not (len(boxes) == len(scores) == len(labels)):
            raise ValueError(f"image_id {image_id}: boxes/scores/labels lengths differ")
        for name, lab in (("gt_labels", gt_labels), ("labels", labels)):
            if lab.size and (lab.min() < 1 or lab.max() > num_classes):
                raise ValueError(
                    f"image_id {image_id}: {name} must be in 1..{num_classes}, got {lab.tolist()}"
                )
        out.append(
            {
                "image_id": image_id,
                "height": int(rec["height"]),
                "width": int(rec["width"]),
                "gt_boxes": gt_boxes,
                "gt_labels": gt_labels,
                "gt_ignore": gt_ignore,
                "boxes": boxes,
                "scores": scores,
                "labels": labels,
            }
        )
    return out


@dataclasses.dataclass(frozen=True)
class _Flat:
    """Every record's arrays concatenated, in record order: per image, per gt and per detection."""

    image_ids: np.ndarray  # (I,) int64
    heights: np.ndarray  # (I,)
    widths: np.ndarray  # (I,)
    gt_count: np.ndarray  # (I,) gt boxes per image
    gt_image: np.ndarray  # (G,) image id of each gt
    gt_boxes: np.ndarray  # (G, 4) xyxy
    gt_labels: np.ndarray  # (G,) 1..K
    gt_ignore: np.ndarray  # (G,) bool
    image: np.ndarray  # (D,) image id of each detection
    boxes: np.ndarray  # (D, 4) xyxy
    scores: np.ndarray  # (D,)
    labels: np.ndarray  # (D,) 1..K


def _flatten(records: Sequence[Record], num_classes: int) -> _Flat:
    recs = check_records(records, num_classes)

    def cat(key: str, empty: np.ndarray) -> np.ndarray:
        return np.concatenate([r[key] for r in recs]) if recs else empty

    def per_image(key: str) -> np.ndarray:
        return np.array([r[key] for r in recs], dtype=np.int64)

    ids = per_image("image_id")
    gt_count = np.array([len(r["gt_labels"]) for r in recs], dtype=np.int64)
    dt_count = np.array([len(r["labels"]) for r in recs], dtype=np.int64)
    no_box, no_int = np.zeros((0, 4)), np.zeros(0, np.int64)
    return _Flat(
        image_ids=ids,
        heights=per_image("height"),
        widths=per_image("width"),
        gt_count=gt_count,
        gt_image=np.repeat(ids, gt_count),
        gt_boxes=cat("gt_boxes", no_box),
        gt_labels=cat("gt_labels", no_int),
        gt_ignore=cat("gt_ignore", np.zeros(0, bool)),
        image=np.repeat(ids, dt_count),
        boxes=cat("boxes", no_box),
        scores=cat("scores", np.zeros(0)),
        labels=cat("labels", no_int),
    )


def _xywh(boxes: np.ndarray) -> np.ndarray:
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def _results_xywh(boxes: np.ndarray) -> np.ndarray:
    """Detection boxes as evaluated and exported: xywh rounded to 2 decimals (1/100 px, far below any IoU that
    matters) to keep the JSON small. Scores are kept exact: rounding them creates ties that reorder detections."""
    return np.round(_xywh(boxes), 2)


def _results(f: _Flat, category_ids: np.ndarray) -> list[dict[str, Any]]:
    bbox = _results_xywh(f.boxes).tolist()
    cats = category_ids[f.labels - 1].tolist()
    return [
        {"image_id": i, "category_id": c, "bbox": b, "score": s}
        for i, c, b, s in zip(f.image.tolist(), cats, bbox, f.scores.tolist(), strict=True)
    ]


def coco_results(records: Sequence[Record], category_ids: Sequence[int]) -> list[dict[str, Any]]:
    """Predictions in the COCO results format (what ``COCO.loadRes`` and the eval server read), in record order.

    ``category_id = category_ids[label - 1]`` maps our contiguous labels back to the dataset's ids (COCO's
    are 1..90 with gaps). Boxes are rounded to 2 decimals, scores kept exact (see ``_results_xywh``).
    """
    cat = np.asarray(list(category_ids), dtype=np.int64)
    return _results(_flatten(records, len(cat)), cat)


def _category_ids(class_names: Sequence[str], category_ids: Sequence[int] | None) -> list[int]:
    ids = [int(i) for i in category_ids] if category_ids is not None else list(range(1, len(class_names) + 1))
    if len(ids) != len(class_names):
        raise ValueError(f"{len(ids)} category ids for {len(class_names)} class names")
    return ids


def _gt_dataset(
    f: _Flat, class_names: Sequence[str], category_ids: list[int], *, with_ignore: bool = False
) -> dict[str, Any]:
    xywh = _xywh(f.gt_boxes)
    area = (xywh[:, 2] * xywh[:, 3]).tolist()
    cats = np.asarray(category_ids, dtype=np.int64)[f.gt_labels - 1].tolist()
    crowd = f.gt_ignore.astype(int).tolist()
    annotations = [
        {"id": n, "image_id": i, "category_id": c, "bbox": b, "area": a, "iscrowd": cr}
        for n, i, c, b, a, cr in zip(
            range(1, len(crowd) + 1), f.gt_image.tolist(), cats, xywh.tolist(), area, crowd, strict=True
        )
    ]
    if with_ignore:
        # Both COCOevals set ann["ignore"] = iscrowd in _prepare; set here, a cached gt is not written to again.
        for a in annotations:
            a["ignore"] = a["iscrowd"]
    images = [
        {"id": i, "height": h, "width": w}
        for i, h, w in zip(f.image_ids.tolist(), f.heights.tolist(), f.widths.tolist(), strict=True)
    ]
    categories = [{"id": i, "name": str(n)} for i, n in zip(category_ids, class_names, strict=True)]
    return {"images": images, "annotations": annotations, "categories": categories}


def coco_ground_truth(
    records: Sequence[Record], class_names: Sequence[str], category_ids: Sequence[int] | None = None
) -> dict[str, Any]:
    """An in-memory COCO instances dict for the records' ground truth.

    Annotation ids start at 1: both backends store the matched gt *id* per detection and read 0 as
    "unmatched", so an annotation with id 0 would never count as a true positive. ``area`` is the box
    area (w*h), not a mask area, so the small/medium/large split follows the boxes we evaluate;
    ``iscrowd`` carries ``gt_ignore`` (a crowd gt is neither TP nor FP, matched by intersection/det-area).
    """
    ids = _category_ids(class_names, category_ids)
    return _gt_dataset(_flatten(records, len(class_names)), class_names, ids)


# ---------------------------------------------------------------------------------------------------------
# Ground truth index (cached)


class _GtIndex:
    """One val set's ground truth, indexed for evaluation: gt sorted by (image, class) cell with each cell's
    slice, plus each backend's gt objects, built on first use. Shared by every evaluation of that val set:
    once built, its arrays and annotation dicts are only read, by us and by both backends (tests check it)."""

    def __init__(self, f: _Flat, class_names: Sequence[str]) -> None:
        empty_dt = {"image": f.image[:0], "boxes": f.boxes[:0], "scores": f.scores[:0], "labels": f.labels[:0]}
        self.flat = dataclasses.replace(f, **empty_dt)  # the gt half only: a cached index holds no detections
        self.class_names = [str(n) for n in class_names]
        self.num_classes = len(self.class_names)
        self.image_ids = np.sort(f.image_ids)
        self.num_images = len(f.image_ids)
        self.num_gt = int((~f.gt_ignore).sum())
        cell = self.cell(f.gt_image, f.gt_labels)
        order = np.argsort(cell, kind="stable")  # within a cell, record order: both backends' gt order
        self.xywh = _xywh(f.gt_boxes)[order]
        self.crowd: list[int] = f.gt_ignore[order].astype(int).tolist()  # a list: mask.iou takes one per cell
        self.ann_ids = order + 1  # as in coco_ground_truth: 1.. in record order
        self.cells, self.start, self.end = _cells(cell[order])
        self._fce_anns: list[dict[str, Any]] = []
        self._fce_dataset: Any = None
        self._pycoco: Any = None

    def cell(self, image: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """(image, class) -> one int, ordered by image id then class: image_index * K + label - 1."""
        return np.searchsorted(self.image_ids, image) * self.num_classes + (labels - 1)

    def fce_dataset(self) -> Any:
        """faster-coco-eval's C++ gt dataset (it keeps references to our dicts and only reads them)."""
        if self._fce_dataset is None:
            area = (self.xywh[:, 2] * self.xywh[:, 3]).tolist()
            # "ignore" as its _prepare sets it; the dicts stay referenced by the dataset, kept here too
            self._fce_anns = [
                {"id": n, "area": a, "iscrowd": c, "ignore": c}
                for n, a, c in zip(self.ann_ids.tolist(), area, self.crowd, strict=True)
            ]
            self._fce_dataset = _fce_load(self._fce_anns, self.cells, self.start, self.end, self)
        return self._fce_dataset

    def pycoco(self) -> Any:
        if self._pycoco is None:
            ids = list(range(1, self.num_classes + 1))
            self._pycoco = _coco_index(_gt_dataset(self.flat, self.class_names, ids, with_ignore=True), "pycocotools")
        return self._pycoco


def _cells(sorted_cells: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct cells of a sorted cell array, with each one's [start, end) slice (linear: no re-sort)."""
    n = len(sorted_cells)
    if n == 0:
        return sorted_cells, np.zeros(0, np.int64), np.zeros(0, np.int64)
    start = np.flatnonzero(np.r_[True, sorted_cells[1:] != sorted_cells[:-1]])
    return sorted_cells[start], start, np.r_[start[1:], n]


_GT_CACHE: OrderedDict[bytes, _GtIndex] = OrderedDict()


def _gt_key(f: _Flat, class_names: Sequence[str]) -> bytes:
    """What identifies a val set's ground truth: every gt array (in record order), the image sizes and the
    class names. A hash of the bytes, not of object ids: the records are rebuilt for every evaluation."""
    h = hashlib.blake2b(digest_size=20)
    h.update(json.dumps([str(n) for n in class_names]).encode())
    for a in (f.image_ids, f.heights, f.widths, f.gt_count, f.gt_boxes, f.gt_labels, f.gt_ignore):
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.digest()


def _gt_index(f: _Flat, class_names: Sequence[str], cache: bool) -> _GtIndex:
    if not cache:
        return _GtIndex(f, class_names)
    key = _gt_key(f, class_names)
    index = _GT_CACHE.get(key)
    if index is None:
        index = _GT_CACHE[key] = _GtIndex(f, class_names)
        while len(_GT_CACHE) > GT_CACHE_SIZE:
            _GT_CACHE.popitem(last=False)
    _GT_CACHE.move_to_end(key)
    return index


def clear_gt_cache() -> None:
    """Forget every cached gt index (frees its memory; the next evaluation rebuilds it)."""
    _GT_CACHE.clear()


# ---------------------------------------------------------------------------------------------------------
# Backends


def resolve_backend(backend: str) -> str:
    """'auto' -> faster_coco_eval when importable (C++ evaluate/accumulate), else pycocotools."""
    if backend == "auto":
        try:
            import faster_coco_eval  # noqa: F401
        except ImportError:
            return "pycocotools"
        return "faster_coco_eval"
    if backend not in BACKENDS:
        raise ValueError(f"unknown COCO backend {backend!r}; known: auto, {', '.join(BACKENDS)}")
    return backend


def _quiet(*args: Any, **kwargs: Any) -> None:
    """faster-coco-eval logs through a print_function; this one drops the chatter."""


def _coco_index(dataset: dict[str, Any], backend: str) -> Any:
    with contextlib.redirect_stdout(io.StringIO()):
        if backend == "faster_coco_eval":
            from faster_coco_eval import COCO
        else:
            from pycocotools.coco import COCO
        coco = COCO()  # pycocotools' constructor only reads files; both accept a dataset set this way
        coco.dataset = dataset
        coco.createIndex()
    if backend == "faster_coco_eval":
        coco.print_function = _quiet
    return coco


def _load_results(coco_gt: Any, results: list[dict[str, Any]], backend: str) -> Any:
    """The backend's cocoDt for ``results`` (whose dicts loadRes modifies: it adds id/area)."""
    if not results:
        # pycocotools' loadRes indexes results[0]; an empty result set is still a valid evaluation
        # (AP/AR 0 where there is ground truth, -1 where there is none), so build it directly.
        return _coco_index(
            {
                "images": list(coco_gt.dataset["images"]),
                "categories": copy.deepcopy(coco_gt.dataset["categories"]),
                "annotations": [],
            },
            backend,
        )
    with contextlib.redirect_stdout(io.StringIO()):
        dt = coco_gt.loadRes(results)
    if backend == "faster_coco_eval":
        dt.print_function = _quiet
    return dt


def build_coco(gt_dict: dict[str, Any], results: list[dict[str, Any]], backend: str) -> tuple[Any, Any]:
    """(cocoGt, cocoDt) objects of ``backend``. ``results`` dicts are modified (loadRes adds id/area)."""
    gt = _coco_index(gt_dict, backend)
    return gt, _load_results(gt, results, backend)


def _max_dets(max_det: int) -> list[int]:
    """``[1, 10, max_det]``; for ``max_det < 10`` the middle entry becomes ``max_det``: both backends sort
    maxDets and score at most its last entry per image and class, so ``[1, 10, 5]`` would quietly compute AP
    at 10 detections and report AR@5 in the AR@10 slot. ``[1, max_det, max_det]`` keeps AP at ``max_det``
    and "AR10" becomes AR@max_det, the most detections that were kept."""
    return [1, min(10, max_det), max_det]


def run_cocoeval(coco_gt: Any, coco_dt: Any, backend: str, max_det: int) -> Any:
    """The backend's own COCOeval: evaluate() + accumulate() with ``maxDets = _max_dets(max_det)``."""
    with contextlib.redirect_stdout(io.StringIO()):
        if backend == "faster_coco_eval":
            from faster_coco_eval import COCOeval_faster

            ev = COCOeval_faster(coco_gt, coco_dt, iouType="bbox", print_function=_quiet)
        else:
            from pycocotools.cocoeval import COCOeval

            ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.maxDets = _max_dets(max_det)
        ev.evaluate()
        ev.accumulate()
    return ev


def _fce_core() -> Any:
    """faster-coco-eval's C++ module when it has what ``_fce_evaluate`` drives (1.8 has), else None."""
    try:
        import faster_coco_eval.faster_eval_api_cpp as core
    except ImportError:
        return None
    ok = hasattr(core, "COCOevalEvaluateAccumulate") and hasattr(getattr(core, "Dataset", None), "load_tuple")
    return core if ok else None


def _fce_load(anns: list[dict[str, Any]], cells: np.ndarray, start: np.ndarray, end: np.ndarray,
              gt: _GtIndex) -> Any:
    """A faster-coco-eval C++ dataset holding ``anns[start[j]:end[j]]`` under (image, class) of ``cells[j]``,
    in one call (``load_tuple``, its unpickling entry) instead of one ``append_ref`` per annotation."""
    k = gt.num_classes
    images = gt.image_ids[cells // k].tolist()
    classes = (cells % k + 1).tolist()
    groups = [(i, c, anns[s:e]) for i, c, s, e in zip(images, classes, start.tolist(), end.tolist(), strict=True)]
    dataset = _fce_core().Dataset()
    dataset.load_tuple((len(groups), groups))
    return dataset


def _fce_evaluate(gt: _GtIndex, f: _Flat, max_det: int) -> Any:
    """faster-coco-eval's evaluate+accumulate on the arrays; a ``COCOeval_faster`` whose ``params`` and
    ``eval`` are what its own ``evaluate()``/``accumulate()`` would leave (tests compare the two).

    What its evaluate() does from its COCO objects is done here from arrays, to the same result: detections
    of each (image, class) sorted by score, stably (ties keep their order, as its stable_sort and
    pycocotools' mergesort do), the first ``max_det`` kept (the only ones ever scored), and the IoU of
    each cell with both gt and detections from its ``mask.iou`` on the same xywh boxes.
    """
    from faster_coco_eval import COCOeval_faster
    from faster_coco_eval.core.mask import iou as box_iou

    k = gt.num_classes
    cell = gt.cell(f.image, f.labels)
    order = np.lexsort((-f.scores, cell))
    cell = cell[order]
    cells, start, end = _cells(cell)
    count = np.minimum(end - start, max_det)
    order = order[np.arange(len(cell)) - np.repeat(start, end - start) < max_det]
    end = np.cumsum(count)
    start = end - count

    xywh = _results_xywh(f.boxes[order])
    anns = [
        {"id": n, "score": s, "area": a}
        for n, s, a in zip((order + 1).tolist(), f.scores[order].tolist(), (xywh[:, 2] * xywh[:, 3]).tolist(),
                           strict=True)
    ]
    dt_dataset = _fce_load(anns, cells, start, end, gt)

    empty: list[float] = []
    ious: list[list[Any]] = [[empty] * k for _ in range(len(gt.image_ids))]
    both, gi, di = np.intersect1d(gt.cells, cells, assume_unique=True, return_indices=True)
    for c, gs, ge, ds, de in zip(both.tolist(), gt.start[gi].tolist(), gt.end[gi].tolist(), start[di].tolist(),
                                 end[di].tolist(), strict=True):
        ious[c // k][c % k] = box_iou(xywh[ds:de], gt.xywh[gs:ge], gt.crowd[gs:ge])

    ev = COCOeval_faster(iouType="bbox", print_function=_quiet)
    p = ev.params
    p.imgIds = gt.image_ids.tolist()
    p.catIds = list(range(1, k + 1))
    p.maxDets = _max_dets(max_det)
    ev._paramsEval = copy.deepcopy(p)
    ev.eval = _fce_core().COCOevalEvaluateAccumulate(
        ev._paramsEval, ious, gt.fce_dataset(), dt_dataset, p.imgIds, p.catIds, True
    )
    return ev


def _evaluate(gt: _GtIndex, f: _Flat, backend: str, max_det: int) -> Any:
    if backend == "faster_coco_eval" and _fce_core() is not None:
        return _fce_evaluate(gt, f, max_det)
    ids = list(range(1, gt.num_classes + 1))
    results = _results(f, np.asarray(ids, dtype=np.int64))
    if backend == "pycocotools":
        coco_gt = gt.pycoco()
    else:  # a faster-coco-eval without the entry points above: its public API, gt rebuilt each time
        coco_gt = _coco_index(_gt_dataset(gt.flat, gt.class_names, ids), backend)
    return run_cocoeval(coco_gt, _load_results(coco_gt, results, backend), backend, max_det)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic GC while an evaluation allocates its ~10 container objects per detection: each allocation
    burst would trigger collections that traverse the whole heap (the records, the cached gt) and find nothing,
    as these structures hold no cycles. Reference counting still frees everything; GC resumes after."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _mean_valid(x: np.ndarray) -> float:
    """COCO's convention: -1 marks "no ground truth here" and is left out; nothing left -> -1."""
    v = x[x > -1]
    return float(v.mean()) if v.size else -1.0


def _t50(p: Any) -> int:
    return int(np.flatnonzero(np.isclose(p.iouThrs, 0.5))[0])


def summarize(ev: Any, max_det: int) -> dict[str, float]:
    """The 12 COCO stats, in COCO's order, from an accumulated COCOeval of either backend."""
    p = ev.params
    prec = np.asarray(ev.eval["precision"])  # [T, R, K, A, M]
    rec = np.asarray(ev.eval["recall"])  # [T, K, A, M]
    t50 = _t50(p)
    t75 = int(np.flatnonzero(np.isclose(p.iouThrs, 0.75))[0])
    a = {lbl: i for i, lbl in enumerate(p.areaRngLbl)}

    def ap(area: str = "all", t: int | None = None) -> float:
        s = prec[:, :, :, a[area], -1]
        return _mean_valid(s if t is None else s[t])

    def ar(area: str = "all", m: int = -1) -> float:
        return _mean_valid(rec[:, :, a[area], m])

    return {
        "AP": ap(),
        "AP50": ap(t=t50),
        "AP75": ap(t=t75),
        "APs": ap("small"),
        "APm": ap("medium"),
        "APl": ap("large"),
        "AR1": ar(m=0),
        "AR10": ar(m=1),
        f"AR{max_det}": ar(m=2),
        "ARs": ar("small"),
        "ARm": ar("medium"),
        "ARl": ar("large"),
    }


def per_class_ap(ev: Any, class_names: Sequence[str]) -> dict[str, dict[str, float]]:
    """AP@[.5:.95] and AP50 per class (area all, maxDets[-1]); nan for a class with no ground truth."""
    prec = np.asarray(ev.eval["precision"])
    t50 = _t50(ev.params)
    out: dict[str, dict[str, float]] = {}
    for k, name in enumerate(class_names):
        s = prec[:, :, k, 0, -1]
        ap, ap50 = _mean_valid(s), _mean_valid(s[t50])
        out[str(name)] = {
            "AP": ap if ap > -1 else float("nan"),
            "AP50": ap50 if ap50 > -1 else float("nan"),
        }
    return out


def pr_curves50(ev: Any, class_names: Sequence[str]) -> tuple[dict[str, Any], list[float | None]]:
    """(``pr50``, ``pr50_all``): COCOeval's accumulated precision at IoU 0.5, area "all", the last maxDets,
    at its 101 recall thresholds, per class (None where it has -1: a class without ground truth), and its
    mean over the classes with ground truth (None where there is none). A class's mean over the 101 points
    is its AP50: that is how COCO computes AP."""
    p = ev.params
    prec = np.asarray(ev.eval["precision"])[_t50(p), :, :, list(p.areaRngLbl).index("all"), -1]  # [R, K]
    valid = prec > -1

    def points(x: np.ndarray, ok: np.ndarray) -> list[float | None]:
        return [float(v) if o else None for v, o in zip(x.tolist(), ok.tolist(), strict=True)]

    per_class = {str(n): points(prec[:, k], valid[:, k]) for k, n in enumerate(class_names)}
    n = valid.sum(axis=1)
    mean = np.where(valid, prec, 0.0).sum(axis=1) / np.maximum(n, 1)
    return {"recall": [float(r) for r in p.recThrs], "precision": per_class}, points(mean, n > 0)


def coco_evaluate(
    records: Sequence[Record],
    class_names: Sequence[str],
    *,
    backend: str = "auto",
    max_det: int = 100,
    cache_gt: bool = True,
) -> dict[str, Any]:
    """COCO bbox AP/AR of the records' predictions against their ground truth.

    Categories are 1..K named by ``class_names``. Returns the 12 stats (``AR{max_det}`` names the third AR;
    with ``max_det <= 10`` it is also ``AR10``), ``per_class`` (AP, AP50), ``pr50``/``pr50_all`` (see
    ``pr_curves50``), counts, the backend used and ``"headline": "AP"``; all plain JSON (floats, None).
    ``cache_gt``: reuse the gt index of an earlier call with the same ground truth (same result either way).
    """
    if max_det < 1:
        raise ValueError(f"max_det must be >= 1, got {max_det}")
    name = resolve_backend(backend)
    with _gc_paused():
        f = _flatten(records, len(class_names))
        gt = _gt_index(f, class_names, cache_gt)
        ev = _evaluate(gt, f, name, max_det)
    out: dict[str, Any] = summarize(ev, max_det)
    out["per_class"] = per_class_ap(ev, class_names)
    out["pr50"], out["pr50_all"] = pr_curves50(ev, class_names)
    out["num_images"] = gt.num_images
    out["num_gt"] = gt.num_gt
    out["num_detections"] = len(f.scores)
    out["max_det"] = int(max_det)
    out["backend"] = name
    out["headline"] = "AP"
    return out
