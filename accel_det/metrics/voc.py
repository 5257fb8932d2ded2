"""PASCAL VOC detection AP (the devkit's VOCevaldet / py-faster-rcnn ``voc_eval`` semantics).

Per class: detections of all images sorted by score; each takes the ground truth box it overlaps most
(*any* gt of its image and class, matched or not, difficult or not); IoU >= ``iou_thresh`` with an
unclaimed non-difficult gt is a TP, with an already-claimed one a FP (duplicate), with a difficult one
neither; below the threshold a FP. ``n_pos`` counts non-difficult gt. AP is VOC2007's 11-point
interpolation or VOC2010+'s area under the monotone precision envelope.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .coco import Record, check_records


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (len(a), len(b)) of xyxy boxes.

    The devkit adds +1 to widths and heights because its boxes are inclusive 1-based pixel indices; our
    boxes are continuous 0-based coordinates (torchvision's convention), so no +1 here. With +1 a 10 px
    box shifted by 1 px would have IoU 0.83 instead of 0.82 — small boxes would score differently.
    """
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / np.maximum(union, np.finfo(np.float64).eps)


def voc_ap(rec: np.ndarray, prec: np.ndarray, use_07_metric: bool) -> float:
    """AP from a recall/precision curve (detections in descending score order)."""
    if use_07_metric:
        # VOC2007: mean of the best precision at recall >= t for t in 0, 0.1, ..., 1. linspace rather than
        # the devkit's 0:0.1:1 so the last point is exactly 1.0 (a full-recall curve must reach it).
        ap = 0.0
        for t in np.linspace(0.0, 1.0, 11):
            p = prec[rec >= t]
            ap += (float(p.max()) if p.size else 0.0) / 11.0
        return ap
    # VOC2010+: make precision monotone (each point takes the best precision at any higher recall), then
    # sum the rectangles where recall changes.
    mrec = np.concatenate([[0.0], rec, [1.0]])
    mpre = np.concatenate([[0.0], prec, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _match_image(
    boxes: np.ndarray, gt: np.ndarray, difficult: np.ndarray, iou_thresh: float
) -> tuple[np.ndarray, np.ndarray]:
    """TP/FP flags of one image's detections of one class, given in descending score order.

    Matching is per image, so each image can be matched on its own as long as its detections keep the
    order they have in the global ranking (stable sort on score in both places).
    """
    tp = np.zeros(len(boxes), dtype=bool)
    fp = np.ones(len(boxes), dtype=bool)
    if not len(gt):
        return tp, fp
    iou = box_iou(boxes, gt)
    jmax = iou.argmax(axis=1)
    ovmax = iou[np.arange(len(boxes)), jmax]
    claimed = np.zeros(len(gt), dtype=bool)
    # The devkit uses ovmax >= minoverlap (py-faster-rcnn uses >; it only matters at exact ties).
    for d in np.flatnonzero(ovmax >= iou_thresh):
        j = jmax[d]
        if difficult[j]:
            fp[d] = False  # neither TP nor FP
        elif not claimed[j]:
            claimed[j] = True
            tp[d], fp[d] = True, False
    return tp, fp


def voc_evaluate(
    records: Sequence[Record], class_names: Sequence[str], *, use_07_metric: bool, iou_thresh: float = 0.5
) -> dict[str, Any]:
    """VOC mAP of the records' predictions; ``gt_ignore`` marks VOC "difficult" boxes.

    Classes without non-difficult ground truth get nan in ``per_class`` and are left out of the mean
    (the devkit would divide by zero there).
    """
    recs = check_records(records, len(class_names))
    num_classes = len(class_names)
    n_pos = np.zeros(num_classes + 1, dtype=np.int64)
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []  # scores, labels, tp, fp
    for r in recs:
        gl, difficult = r["gt_labels"], r["gt_ignore"]
        n_pos += np.bincount(gl[~difficult], minlength=num_classes + 1)
        if not len(r["scores"]):
            continue
        # Detections grouped by label, each group in descending score order (lexsort is stable, so tied
        # scores keep their input order here and in the global ranking below). A detection of a class
        # with no gt in this image is a FP; only the classes present in the gt need matching.
        order = np.lexsort((-r["scores"], r["labels"]))
        labels, boxes = r["labels"][order], r["boxes"][order]
        tp = np.zeros(len(order), dtype=bool)
        fp = np.ones(len(order), dtype=bool)
        for k in np.unique(gl):
            lo, hi = np.searchsorted(labels, [k, k + 1])
            if lo < hi:
                gmask = gl == k
                tp[lo:hi], fp[lo:hi] = _match_image(
                    boxes[lo:hi], r["gt_boxes"][gmask], difficult[gmask], iou_thresh
                )
        parts.append((r["scores"][order], labels, tp, fp))

    if parts:
        scores, labels, tp, fp = (np.concatenate(x) for x in zip(*parts, strict=True))
        rank = np.argsort(-scores, kind="stable")
        labels, tp, fp = labels[rank], tp[rank], fp[rank]
    else:
        labels, tp, fp = np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0, bool)
    per_class: dict[str, float] = {}
    for k, name in enumerate(class_names, start=1):
        if n_pos[k] == 0:
            per_class[str(name)] = float("nan")
            continue
        mine = labels == k
        tp_cum, fp_cum = np.cumsum(tp[mine]), np.cumsum(fp[mine])
        rec = tp_cum / n_pos[k]
        prec = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps)
        per_class[str(name)] = voc_ap(rec, prec, use_07_metric)
    valid = [v for v in per_class.values() if not np.isnan(v)]
    return {
        "mAP": float(np.mean(valid)) if valid else float("nan"),
        "per_class": per_class,
        "metric": "voc07" if use_07_metric else "voc12",
        "iou_thresh": float(iou_thresh),
        "num_images": len(recs),
        "num_gt": int(n_pos.sum()),
        "num_detections": int(sum(len(r["scores"]) for r in recs)),
        "headline": "mAP",
    }
