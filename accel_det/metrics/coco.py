"""COCO bbox metric over gathered per-image records, on faster-coco-eval or pycocotools.

The trainer hands the main process plain records (numpy only, no torch); this module turns them into an
in-memory COCO ground truth + results list and runs the reference COCOeval on either backend. The 12
summary numbers are computed here from ``eval["precision"]``/``eval["recall"]`` rather than by the
backends' ``summarize()``: pycocotools hard-codes ``maxDets=100`` for the headline AP (it returns -1 for any
other ``max_det``) and both print. On the default setting our numbers equal their ``stats`` exactly
(tests/test_metrics.py checks it).
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

BACKENDS = ("faster_coco_eval", "pycocotools")
Record = Mapping[str, Any]


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


def _xywh(boxes: np.ndarray) -> np.ndarray:
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def coco_results(records: Sequence[Record], category_ids: Sequence[int]) -> list[dict[str, Any]]:
    """Predictions in the COCO results format (what ``COCO.loadRes`` and the eval server read).

    ``category_id = category_ids[label - 1]`` maps our contiguous labels back to the dataset's ids (COCO's
    are 1..90 with gaps). Boxes are rounded to 2 decimals (1/100 px, far below any IoU that matters) to keep
    the JSON small; scores are kept exact because rounding them creates ties that reorder detections.
    """
    cat = np.asarray(list(category_ids), dtype=np.int64)
    out: list[dict[str, Any]] = []
    for rec in check_records(records, len(cat)):
        if not len(rec["boxes"]):
            continue
        bbox = np.round(_xywh(rec["boxes"]), 2).tolist()
        cats = cat[rec["labels"] - 1].tolist()
        image_id = rec["image_id"]
        out.extend(
            {"image_id": image_id, "category_id": c, "bbox": b, "score": s}
            for c, b, s in zip(cats, bbox, rec["scores"].tolist(), strict=True)
        )
    return out


def coco_ground_truth(
    records: Sequence[Record], class_names: Sequence[str], category_ids: Sequence[int] | None = None
) -> dict[str, Any]:
    """An in-memory COCO instances dict for the records' ground truth.

    Annotation ids start at 1: both backends store the matched gt *id* per detection and read 0 as
    "unmatched", so an annotation with id 0 would never count as a true positive. ``area`` is the box
    area (w*h), not a mask area, so the small/medium/large split follows the boxes we evaluate;
    ``iscrowd`` carries ``gt_ignore`` (a crowd gt is neither TP nor FP, matched by intersection/det-area).
    """
    ids = list(category_ids) if category_ids is not None else list(range(1, len(class_names) + 1))
    if len(ids) != len(class_names):
        raise ValueError(f"{len(ids)} category ids for {len(class_names)} class names")
    cat = np.asarray(ids, dtype=np.int64)
    images, annotations = [], []
    for rec in check_records(records, len(class_names)):
        images.append({"id": rec["image_id"], "height": rec["height"], "width": rec["width"]})
        xywh = _xywh(rec["gt_boxes"])
        areas = (xywh[:, 2] * xywh[:, 3]).tolist()
        for b, a, c, crowd in zip(
            xywh.tolist(), areas, cat[rec["gt_labels"] - 1].tolist(), rec["gt_ignore"].tolist(), strict=True
        ):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": rec["image_id"],
                    "category_id": c,
                    "bbox": b,
                    "area": a,
                    "iscrowd": int(crowd),
                }
            )
    categories = [{"id": int(i), "name": str(n)} for i, n in zip(ids, class_names, strict=True)]
    return {"images": images, "annotations": annotations, "categories": categories}


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


def build_coco(gt_dict: dict[str, Any], results: list[dict[str, Any]], backend: str) -> tuple[Any, Any]:
    """(cocoGt, cocoDt) objects of ``backend``. ``results`` dicts are modified (loadRes adds id/area)."""
    with contextlib.redirect_stdout(io.StringIO()):
        if backend == "faster_coco_eval":
            from faster_coco_eval import COCO
        else:
            from pycocotools.coco import COCO
        gt = COCO()  # pycocotools' constructor only reads files; both accept a dataset set this way
        gt.dataset = gt_dict
        gt.createIndex()
        if results:
            dt = gt.loadRes(results)
        else:
            # pycocotools' loadRes indexes results[0]; an empty result set is still a valid evaluation
            # (AP/AR 0 where there is ground truth, -1 where there is none), so build it directly.
            dt = COCO()
            dt.dataset = {
                "images": list(gt_dict["images"]),
                "categories": copy.deepcopy(gt_dict["categories"]),
                "annotations": [],
            }
            dt.createIndex()
    if backend == "faster_coco_eval":
        gt.print_function = dt.print_function = _quiet
    return gt, dt


def run_cocoeval(coco_gt: Any, coco_dt: Any, backend: str, max_det: int) -> Any:
    """evaluate() + accumulate() with ``maxDets = [1, 10, max_det]``; returns the COCOeval object.

    For ``max_det < 10`` the middle entry becomes ``max_det``: both backends sort maxDets and score at most
    its last entry per image and class, so ``[1, 10, 5]`` would quietly compute AP at 10 detections and
    report AR@5 in the AR@10 slot. ``[1, max_det, max_det]`` keeps AP at ``max_det`` and "AR10" becomes
    AR@max_det, the most detections that were kept.
    """
    with contextlib.redirect_stdout(io.StringIO()):
        if backend == "faster_coco_eval":
            from faster_coco_eval import COCOeval_faster

            ev = COCOeval_faster(coco_gt, coco_dt, iouType="bbox", print_function=_quiet)
        else:
            from pycocotools.cocoeval import COCOeval

            ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.maxDets = [1, min(10, max_det), max_det]
        ev.evaluate()
        ev.accumulate()
    return ev


def _mean_valid(x: np.ndarray) -> float:
    """COCO's convention: -1 marks "no ground truth here" and is left out; nothing left -> -1."""
    v = x[x > -1]
    return float(v.mean()) if v.size else -1.0


def summarize(ev: Any, max_det: int) -> dict[str, float]:
    """The 12 COCO stats, in COCO's order, from an accumulated COCOeval of either backend."""
    p = ev.params
    prec = np.asarray(ev.eval["precision"])  # [T, R, K, A, M]
    rec = np.asarray(ev.eval["recall"])  # [T, K, A, M]
    t50 = int(np.flatnonzero(np.isclose(p.iouThrs, 0.5))[0])
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
    t50 = int(np.flatnonzero(np.isclose(ev.params.iouThrs, 0.5))[0])
    out: dict[str, dict[str, float]] = {}
    for k, name in enumerate(class_names):
        s = prec[:, :, k, 0, -1]
        ap, ap50 = _mean_valid(s), _mean_valid(s[t50])
        out[str(name)] = {
            "AP": ap if ap > -1 else float("nan"),
            "AP50": ap50 if ap50 > -1 else float("nan"),
        }
    return out


def coco_evaluate(
    records: Sequence[Record], class_names: Sequence[str], *, backend: str = "auto", max_det: int = 100
) -> dict[str, Any]:
    """COCO bbox AP/AR of the records' predictions against their ground truth.

    Categories are 1..K named by ``class_names``. Returns the 12 stats (``AR{max_det}`` names the third AR;
    with ``max_det <= 10`` it is also ``AR10``),
    ``per_class``, counts, the backend used and ``"headline": "AP"``; every number is a plain float.
    """
    if max_det < 1:
        raise ValueError(f"max_det must be >= 1, got {max_det}")
    name = resolve_backend(backend)
    gt_dict = coco_ground_truth(records, class_names)
    results = coco_results(records, list(range(1, len(class_names) + 1)))
    num_detections = len(results)
    ev = run_cocoeval(*build_coco(gt_dict, results, name), name, max_det)
    out: dict[str, Any] = summarize(ev, max_det)
    out["per_class"] = per_class_ap(ev, class_names)
    out["num_images"] = len(gt_dict["images"])
    out["num_gt"] = sum(1 for a in gt_dict["annotations"] if not a["iscrowd"])
    out["num_detections"] = num_detections
    out["max_det"] = int(max_det)
    out["backend"] = name
    out["headline"] = "AP"
    return out
