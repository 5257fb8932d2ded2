"""Human-readable views of a metric result: a rich table and a one-line summary for logs."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from rich.table import Table

# Summary keys shown first, in this order, when the result has them (COCO keeps its own AR{max_det} name).
_COCO_SUMMARY = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10")
_COCO_SUMMARY_TAIL = ("ARs", "ARm", "ARl")


def fmt_metric(value: Any, digits: int = 4) -> str:
    """A metric value for display; '-' where there is no ground truth to score (COCO's -1, nan, None)."""
    if value is None:
        return "-"
    v = float(value)
    if math.isnan(v) or v == -1.0:
        return "-"
    return f"{v:.{digits}f}"


def summary_keys(result: Mapping[str, Any]) -> list[str]:
    """The summary numbers of a result, headline first."""
    if result.get("headline") == "AP":
        max_det = result.get("max_det")
        ar_max = f"AR{max_det}" if max_det is not None else None
        keys = [
            *_COCO_SUMMARY,
            *([ar_max] if ar_max and ar_max not in _COCO_SUMMARY else []),
            *_COCO_SUMMARY_TAIL,
        ]
        return [k for k in keys if k in result]
    head = str(result.get("headline", "mAP"))
    return [head] if head in result else []


def metrics_table(result: Mapping[str, Any], title: str = "Evaluation") -> Table:
    """Summary rows (AP, AP50, ... or mAP), then one row per class (AP, and AP50 for COCO)."""
    per_class: Mapping[str, Any] = result.get("per_class", {})
    coco = result.get("headline") == "AP"
    caption = []
    if "backend" in result:
        caption.append(f"backend {result['backend']}")
    if "metric" in result:
        caption.append(str(result["metric"]))
    for key in ("num_images", "num_gt", "num_detections"):
        if key in result:
            caption.append(f"{key.removeprefix('num_')} {result[key]}")
    # No column header: the summary and the per-class section have different columns, so each section
    # gets its own bold header row instead.
    table = Table(title=title, caption=", ".join(caption) or None, show_header=False)
    table.add_column(justify="left")
    table.add_column(justify="right")
    if coco:
        table.add_column(justify="right")
    pad = [""] if coco else []

    table.add_row("[bold]metric", "[bold]value", *pad)
    for key in summary_keys(result):
        table.add_row(key, fmt_metric(result[key]), *pad)
    if per_class:
        table.add_section()
        table.add_row("[bold]class", "[bold]AP", *(["[bold]AP50"] if coco else []))
        for name, v in per_class.items():
            if coco:
                table.add_row(str(name), fmt_metric(v.get("AP")), fmt_metric(v.get("AP50")))
            else:
                table.add_row(str(name), fmt_metric(v))
    return table
