"""A detection confusion matrix over gathered per-image records (numpy only, like the rest of ``metrics/``).

Rows are the truth, columns the prediction; index ``K`` (after the K classes) is *background*:

- ``[t, p]``: a ground-truth object of class t matched by a detection of class p (t == p: correct; else a
  confusion);
- ``[t, K]``: a ground-truth object no detection matched (missed);
- ``[K, p]``: a detection of class p that matched no ground truth (a false positive).

The matching rule, per image: detections below ``conf`` are dropped; the rest are taken in descending score
(stable, so equal scores keep their input order); each takes the *unclaimed* ground-truth box it overlaps most,
whatever its class, if that IoU is ``>= iou``; a box is claimed by at most one detection and a detection
claims at most one box. Matching across classes is the point: a square detected as a circle must land in
``[square, circle]``, not as one miss plus one false positive. Ground truth flagged ``gt_ignore`` (VOC
difficult, COCO crowd) is never claimed nor missed: as in COCOeval, a detection that matches no other box but
overlaps an ignored one by ``>= iou`` counts nowhere.

The IoU threshold is not the evaluation's: ``conf`` (0.25) and ``iou`` (0.45) describe a deployed detector's
operating point (ultralytics' defaults), whereas mAP is computed over every detection down to a near-zero score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .coco import Record, check_records
from .voc import box_iou

DEFAULT_CONF = 0.25
DEFAULT_IOU = 0.45


@dataclass
class ConfusionMatrix:
    class_names: list[str]
    conf: float
    iou: float
    matrix: np.ndarray  # (K + 1, K + 1) int64: rows truth, columns prediction, index K background
    ignored: int = 0  # detections that only matched ignored (difficult / crowd) ground truth

    @property
    def labels(self) -> list[str]:
        return [*self.class_names, "background"]

    def normalized(self) -> np.ndarray:
        """Each row divided by its sum (a row of zeros stays zeros): for a class, where its objects went
        (the diagonal is its recall at this operating point); for background, which classes its false
        positives were given."""
        sums = self.matrix.sum(axis=1, keepdims=True)
        return np.divide(self.matrix, sums, out=np.zeros(self.matrix.shape), where=sums > 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "classes": self.labels,
            "conf": self.conf,
            "iou": self.iou,
            "rows": "ground truth",
            "columns": "prediction",
            "matrix": self.matrix.tolist(),
            "normalized": np.round(self.normalized(), 6).tolist(),
            "ignored_detections": self.ignored,
        }


def match_image(gt_boxes: np.ndarray, gt_ignore: np.ndarray, boxes: np.ndarray, scores: np.ndarray,
                iou: float) -> tuple[np.ndarray, np.ndarray]:
    """The module's rule on one image (detections already above ``conf``). Returns, per detection, the index
    of the ground-truth box it claimed (-1: none, -2: ignored: it overlaps only an ignored box), and a mask of
    the claimed ground truth."""
    claimed = np.zeros(len(gt_boxes), dtype=bool)
    match = np.full(len(boxes), -1, dtype=np.int64)
    if not len(boxes) or not len(gt_boxes):
        return match, claimed
    ious = box_iou(boxes, gt_boxes)  # (detections, gt), all pairs at once
    ious[:, gt_ignore] = -1.0  # ignored boxes are looked at only for what nothing else matched
    for d in np.argsort(-scores, kind="stable"):
        row = np.where(claimed, -1.0, ious[d])
        j = int(row.argmax())
        if row[j] >= iou:
            match[d], claimed[j] = j, True
    if gt_ignore.any():
        left = match == -1
        overlaps_ignored = (box_iou(boxes[left], gt_boxes[gt_ignore]) >= iou).any(axis=1)
        match[np.flatnonzero(left)[overlaps_ignored]] = -2
    return match, claimed


def confusion_matrix(records: Sequence[Record], class_names: Sequence[str], *, conf: float = DEFAULT_CONF,
                     iou: float = DEFAULT_IOU) -> ConfusionMatrix:
    """The confusion matrix of the records' detections at (``conf``, ``iou``) by the module's rule."""
    if not 0.0 <= conf <= 1.0 or not 0.0 < iou <= 1.0:
        raise ValueError(f"confusion matrix: conf must be in [0, 1] and iou in (0, 1], got {conf}, {iou}")
    k = len(class_names)
    m = np.zeros((k + 1, k + 1), dtype=np.int64)
    ignored = 0
    for r in check_records(records, k):
        keep = r["scores"] >= conf
        boxes, scores, pred = r["boxes"][keep], r["scores"][keep], r["labels"][keep] - 1
        truth, gt_ignore = r["gt_labels"] - 1, r["gt_ignore"]
        match, claimed = match_image(r["gt_boxes"], gt_ignore, boxes, scores, iou)
        hit = match >= 0
        np.add.at(m, (truth[match[hit]], pred[hit]), 1)
        np.add.at(m, (k, pred[match == -1]), 1)
        np.add.at(m, (truth[~claimed & ~gt_ignore], k), 1)
        ignored += int((match == -2).sum())
    return ConfusionMatrix([str(n) for n in class_names], float(conf), float(iou), m, ignored)
