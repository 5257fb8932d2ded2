"""Everything a report is made of, written under ``RUN_DIR/plots/`` and ``RUN_DIR/report.html``.

``write_report`` is shared by the end of training (``ReportHook``: a figure that fails is one warning line, the
finished run is not failed by a plot) and ``accel-det report`` (``strict``: an error is an error). A figure
that cannot be made from what the run holds (no evaluation yet, a VOC metric without curves, no predictions)
is not an error: it is skipped with a note, which the command prints and the page shows.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from accel_det.config import Recipe
from accel_det.errors import DatasetError, describe
from accel_det.jsonio import write_json_atomic
from accel_det.metrics.confusion import DEFAULT_CONF, DEFAULT_IOU, confusion_matrix

MAX_LABEL_IMAGES = 2000  # images whose sizes are read for the box geometry (instance counts use every image)
GRID_IMAGES = 16


@dataclass
class ReportData:
    run_dir: Path
    recipe: Recipe
    weights: str  # what made the predictions, for the page
    records: list[dict[str, Any]] | None = None  # val predictions (evaluator records, original pixels)
    eval_result: dict[str, Any] | None = None  # the evaluation of those weights
    eval_source: str = ""
    train_set: Any = None
    train_error: str = ""  # why there is no train_set
    val_set: Any = None
    conf: float = DEFAULT_CONF
    iou: float = DEFAULT_IOU


@dataclass
class Written:
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was skipped, and why


def write_report(data: ReportData, *, strict: bool, warn: Callable[[str], None] = print) -> Written:
    """Every figure, then the page. ``strict``: errors propagate; else each is one ``warn`` line and the rest
    is still written."""
    from accel_det.reporting.html import render_html

    plots = data.run_dir / "plots"
    out = Written()
    makers: list[tuple[str, Callable[[Path], str | None]]] = [
        ("results.png", lambda p: _results(data, p)),
        ("pr_curve.png", lambda p: _pr_curve(data, p)),
        ("confusion_matrix.png", lambda p: _confusion(data, p, out)),
        ("labels.png", lambda p: _labels(data, p)),
        ("val_predictions.png", lambda p: _predictions(data, p)),
    ]
    for name, make in makers:
        try:
            note = make(plots / name)
        except Exception as exc:  # a finished run is not failed by a figure: said in one line, not hidden
            if strict:
                raise
            note = f"{name} failed: {describe(exc)}"
            warn(f"warning: report: {note}")
        if note is None:
            out.files.append(plots / name)
        else:
            out.notes.append(note)
            (plots / name).unlink(missing_ok=True)  # an older report's figure would pass for this one's
    page = data.run_dir / "report.html"
    try:
        text = render_html(data, [f for f in out.files if f.suffix == ".png"], out.notes)
        page.with_name(".report.html.tmp").write_text(text, encoding="utf-8")
        page.with_name(".report.html.tmp").replace(page)
        out.files.append(page)
    except Exception as exc:  # as above
        if strict:
            raise
        warn(f"warning: report: report.html failed: {describe(exc)}")
    return out


def headline_keys(recipe: Recipe) -> list[str]:
    return ["AP", "AP50"] if recipe.eval.metric == "coco" else ["mAP"]


def _results(data: ReportData, path: Path) -> str | None:
    from accel_det.reporting.history import read_history
    from accel_det.reporting.plots import results_figure, save_png

    history = read_history(data.run_dir / "metrics.jsonl")
    save_png(results_figure(history, headline_keys(data.recipe)), path)
    return None


def _pr_curve(data: ReportData, path: Path) -> str | None:
    from accel_det.reporting.plots import pr_figure, save_png

    result = data.eval_result
    if result is None:
        return (f"pr_curve.png skipped: these weights have no evaluation yet (accel-det evaluate {data.run_dir} "
                "--checkpoint ... writes one)")
    if "pr50" not in result:
        if result.get("headline") != "AP":
            return (f"pr_curve.png skipped: eval.metric = {data.recipe.eval.metric} reports one AP per class, "
                    "no precision-recall curve (eval.metric = 'coco' keeps the curves)")
        return (f"pr_curve.png skipped: {data.eval_source} holds no precision-recall curves (pr50: written by an "
                "accel_det older than them; accel-det evaluate writes a new one)")
    save_png(pr_figure(result, f"precision-recall at IoU 0.5 ({data.eval_source})"), path)
    return None


def _confusion(data: ReportData, path: Path, out: Written) -> str | None:
    from accel_det.reporting.plots import confusion_figure, save_png

    if data.records is None:
        path.with_suffix(".json").unlink(missing_ok=True)
        return "confusion_matrix.png skipped: no val predictions"
    cm = confusion_matrix(data.records, data.recipe.output_class_names, conf=data.conf, iou=data.iou)
    write_json_atomic(path.with_suffix(".json"), cm.to_dict())
    out.files.append(path.with_suffix(".json"))
    save_png(confusion_figure(cm), path)
    return None


def _source(rec: Any) -> Any:
    """Where a record's pixels are: its file, or the image embedded in a dataset file (a Hugging Face row)."""
    image = getattr(rec, "image", None)
    return rec.path if image is None else image


def _size(rec: Any) -> tuple[int, int]:
    """(width, height) as training sees the image: from a file's header, else decoded."""
    from accel_det.data.images import image_size, load_image

    source = _source(rec)
    if isinstance(source, str | Path):
        return image_size(Path(source))
    h, w = load_image(source).shape[-2:]
    return int(w), int(h)


def _datasets(train_set: Any) -> list[Any]:
    return list(getattr(train_set, "datasets", None) or [train_set])  # a [data.mix] MixedDataset: both sets


def label_stats(train_set: Any, class_names: list[str], max_images: int = MAX_LABEL_IMAGES) -> Any:
    """``LabelStats`` of the boxes training sees (difficult ones only when ``data.keep_difficult``): counts
    from every image, geometry from at most ``max_images`` evenly spread ones (their sizes are read from the
    files' headers; an unreadable file is left out, as training leaves it out)."""
    from accel_det.reporting.plots import LabelStats

    items = [(rec, ds.keep_difficult) for ds in _datasets(train_set) for rec in ds.records]
    counts = np.zeros(len(class_names), dtype=np.int64)
    for rec, keep_difficult in items:
        labels = rec.labels if keep_difficult else rec.labels[~rec.difficult]
        counts += np.bincount(labels - 1, minlength=len(class_names))[: len(class_names)]
    picked = np.unique(np.linspace(0, len(items) - 1, min(len(items), max_images)).round().astype(int))
    labels_, boxes_, aspect_ = [], [], []
    sampled = 0
    for i in picked:
        rec, keep_difficult = items[i]
        try:
            w, h = _size(rec)
        except DatasetError:
            continue
        sampled += 1
        keep = slice(None) if keep_difficult else ~rec.difficult
        b = rec.boxes[keep].astype(np.float64)
        frac = b.clip(0, 1) if rec.normalized else (b / [w, h, w, h]).clip(0, 1)
        bw, bh = frac[:, 2] - frac[:, 0], frac[:, 3] - frac[:, 1]
        ok = (bw > 0) & (bh > 0)
        labels_.append(rec.labels[keep][ok])
        boxes_.append(np.stack([(frac[:, 0] + frac[:, 2]) / 2, (frac[:, 1] + frac[:, 3]) / 2, bw, bh], 1)[ok])
        aspect_.append((bw * w / np.maximum(bh * h, 1e-9))[ok])
    return LabelStats(
        class_names=list(class_names),
        counts=counts,
        labels=np.concatenate(labels_) if labels_ else np.zeros(0, np.int64),
        boxes=np.concatenate(boxes_) if boxes_ else np.zeros((0, 4)),
        aspect=np.concatenate(aspect_) if aspect_ else np.zeros(0),
        images=len(items),
        sampled=sampled,
    )


def _labels(data: ReportData, path: Path) -> str | None:
    from accel_det.reporting.plots import labels_figure, save_png

    if data.train_set is None:
        return f"labels.png skipped: no train split ({data.train_error or 'not given'})"
    save_png(labels_figure(label_stats(data.train_set, data.recipe.output_class_names)), path)
    return None


def _predictions(data: ReportData, path: Path) -> str | None:
    """The first ``GRID_IMAGES`` val images (by image id) with their ground truth and predictions."""
    from accel_det.data.images import load_image
    from accel_det.reporting.plots import Shown, predictions_figure, save_png

    if data.records is None or data.val_set is None:
        return "val_predictions.png skipped: no val predictions"
    sources = {rec.image_id: rec for rec in data.val_set.records}
    shown: list[Shown] = []
    for rec in sorted(data.records, key=lambda r: int(r["image_id"])):
        if len(shown) == GRID_IMAGES:
            break
        source = sources.get(int(rec["image_id"]))
        if source is None or rec.get("unreadable"):
            continue
        try:
            image = load_image(_source(source), data.recipe.model.channels)
        except DatasetError:  # evaluation already left it out and said so
            continue
        shown.append(Shown(image.permute(1, 2, 0).numpy(), rec, Path(source.path).name))
    save_png(predictions_figure(shown, data.recipe.output_class_names, data.conf), path, palette=True)
    return None


def read_json(path: Path) -> dict[str, Any] | None:
    """A run file the page shows (env.json, recipe.json); None when it is not there."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
