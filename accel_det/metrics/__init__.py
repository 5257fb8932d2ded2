"""Detection metrics over gathered per-image records (numpy only: no torch, no accelerate).

A record is one image: ``image_id``, ``height``, ``width`` (original size), ``gt_boxes`` (n, 4) xyxy px,
``gt_labels`` (n,) in 1..K, ``gt_ignore`` (n,) bool (COCO iscrowd / VOC difficult), and the predictions
``boxes`` (m, 4) xyxy px, ``scores`` (m,), ``labels`` (m,) in 1..K. The trainer gathers and deduplicates
them across processes and calls these on the main process only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .coco import Record, coco_evaluate, coco_results
from .report import metrics_table
from .voc import voc_evaluate

METRICS = ("coco", "voc07", "voc12")


def evaluate_records(
    records: Sequence[Record],
    class_names: Sequence[str],
    *,
    metric: str = "coco",
    backend: str = "auto",
    max_det: int = 100,
) -> dict[str, Any]:
    """Run ``metric`` (eval.metric); ``result[result["headline"]]`` is the number to select "best" by.

    ``backend`` and ``max_det`` apply to COCO only: VOC scores every detection it is given.
    """
    if metric == "coco":
        return coco_evaluate(records, class_names, backend=backend, max_det=max_det)
    if metric in ("voc07", "voc12"):
        return voc_evaluate(records, class_names, use_07_metric=metric == "voc07")
    raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")


__all__ = [
    "METRICS",
    "Record",
    "coco_evaluate",
    "coco_results",
    "evaluate_records",
    "metrics_table",
    "voc_evaluate",
]
