"""``report.html``: one self-contained page (the PNGs inline as base64, the style inline, no script, nothing
fetched), so it opens from disk in any browser and survives being mailed or copied off a cluster alone."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

from accel_det.metrics.report import fmt_metric, summary_keys
from accel_det.reporting.build import ReportData, read_json
from accel_det.reporting.history import read_history

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0; font-size: .9em; }
td, th { border: 1px solid #ddd; padding: .25em .6em; text-align: right; }
td:first-child, th:first-child { text-align: left; }
th { background: #f4f4f4; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #666; font-size: .85em; }
pre { background: #f7f7f7; padding: .8em; overflow-x: auto; font-size: .8em; }
.notes li { color: #8a5a00; } .meta td { text-align: left; }
"""

_CAPTIONS = {
    "results": "losses, learning rate and throughput against optimizer steps; each evaluation at its step",
    "pr_curve": "precision-recall at IoU 0.5 per class (COCOeval's 101 recall points), AP@0.5 in the legend",
    "confusion_matrix": "rows the ground truth, columns the prediction; background: missed objects (column) "
                        "and false positives (row). Numbers in confusion_matrix.json",
    "labels": "the training split: instances per class, box centres, sizes and aspect ratios",
    "val_predictions": "val images: ground truth dashed white, predictions in the class colour",
}


def _table(header: Sequence[str] | None, rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    head = "" if header is None else "<tr>" + "".join(f"<th>{escape(str(h))}</th>" for h in header) + "</tr>"
    body = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table{f' class={cls!r}' if cls else ''}>{head}{body}</table>"


def _metrics(result: Mapping[str, Any]) -> str:
    """The summary numbers, then one row per class (AP and AP50 for COCO, AP for VOC)."""
    summary = _table(["metric", "value"], [(k, fmt_metric(result[k])) for k in summary_keys(result)])
    per_class = result.get("per_class") or {}
    if not per_class:
        return summary
    if result.get("headline") == "AP":
        rows = [(n, fmt_metric((v or {}).get("AP")), fmt_metric((v or {}).get("AP50"))) for n, v in per_class.items()]
        return summary + _table(["class", "AP", "AP50"], rows)
    return summary + _table(["class", "AP"], [(n, fmt_metric(v)) for n, v in per_class.items()])


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    caption = f"{path.name}: {_CAPTIONS.get(path.stem, '')}"
    return (f'<figure id="{escape(path.stem)}"><img alt="{escape(path.name)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def _pre(obj: Any) -> str:
    return f"<pre>{escape(json.dumps(obj, indent=2), quote=False)}</pre>"


def _evaluations(data: ReportData) -> list[tuple[str, str]]:
    """(label, value) lines about the run's evaluations: the best and the last per split."""
    path = data.run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    history = read_history(path)
    head = "AP" if data.recipe.eval.metric == "coco" else "mAP"
    lines = []
    for split, events in history.evals.items():
        best = history.best(head, split)
        if best is not None:
            lines.append((f"best {split} {head}", f"{fmt_metric(best.get(head))} at epoch {best['epoch']}"))
        last = events[-1]
        lines.append((f"last {split} {head}", f"{fmt_metric(last.get(head))} at epoch {last['epoch']}"))
    return lines


def render_html(data: ReportData, pngs: Sequence[Path], notes: Sequence[str]) -> str:
    recipe = data.recipe
    recipe_json = read_json(data.run_dir / "recipe.json") or recipe.model_dump(mode="json")
    env = read_json(data.run_dir / "env.json")
    title = f"{recipe.mission.name} round {recipe.mission.round}"
    meta = [
        ("run dir", str(data.run_dir.resolve())),
        ("model", f"{recipe.model.name} at {recipe.model.img_dim} px, {len(recipe.output_class_names)} classes"),
        ("predictions by", data.weights),
        ("metric", f"{recipe.eval.metric}" + (f" ({data.eval_source})" if data.eval_source else "")),
        *_evaluations(data),
        ("written", time.strftime("%Y-%m-%d %H:%M:%S")),
    ]
    parts = [
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{escape(title)}: accel_det report"
        f"</title><style>{_STYLE}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        _table(None, meta, "meta"),
    ]
    if notes:
        parts.append("<ul class='notes'>" + "".join(f"<li>{escape(n)}</li>" for n in notes) + "</ul>")
    parts.append("<h2>Evaluation</h2>")
    if data.eval_result is not None:
        parts.append(_metrics(data.eval_result))
    else:
        parts.append("<p>No evaluation of these weights yet.</p>")
    parts.append("<h2>Plots</h2>")
    parts.extend(_image(p) for p in pngs)
    parts.append("<h2>Recipe</h2>" + _pre(recipe_json))
    parts.append("<h2>Environment</h2>" + (_pre(env) if env is not None else "<p>No env.json.</p>"))
    parts.append("</body></html>")
    return "\n".join(parts)
