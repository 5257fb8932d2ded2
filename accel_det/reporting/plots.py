"""The report's figures, from plain data (a ``History``, an evaluation result, a ``ConfusionMatrix``, arrays).

Figures are ``matplotlib.figure.Figure`` objects drawn on their own Agg canvas, never through pyplot: no
global figure registry, nothing to leak between figures or into a user's notebook backend, safe in a training
process. ``save_png`` writes a figure whole (temp file + rename) and lets it go.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from accel_det.metrics.confusion import ConfusionMatrix
from accel_det.reporting.history import History

MAX_LEGEND = 20  # classes named in a legend; past it the lines are drawn without one (80 COCO names hide the plot)
MAX_ANNOTATED = 30  # confusion-matrix rows whose cells get their number written in


def new_figure(width: float, height: float, layout: str | None = "constrained") -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: Path, palette: bool = False) -> Path:
    """``palette``: 256 colours (for figures of photos: a grid of noisy images is megabytes as true-colour PNG,
    a fifth of that as a palette, and report.html carries it inline)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("wb") as f:
            if palette:
                from PIL import Image

                canvas = fig.canvas
                canvas.draw()
                rgb = Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3])
                rgb.quantize(256, method=Image.Quantize.FASTOCTREE).save(f, format="png")
            else:
                fig.savefig(f, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        fig.clear()
    return path


def _grid(n: int, cols: int, cell: tuple[float, float], margins: tuple[float, ...] = (0.55, 0.15, 0.5, 0.35),
          space: tuple[float, float] = (0.3, 0.5)) -> tuple[Figure, list[Axes]]:
    """``n`` panels of ``cell`` inches, ``cols`` a row, ``margins`` (left, right, bottom, top) in inches and
    ``space`` between panels in panel widths / heights. Spaced by hand: a constrained layout of a dozen panels
    costs as much as drawing them, and same-sized panels need nothing it computes."""
    cols = max(1, min(cols, n))
    rows = max(1, math.ceil(n / cols))
    left, right, bottom, top = margins
    width, height = cell[0] * cols, cell[1] * rows + top
    fig = new_figure(width, height, layout=None)
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                        wspace=space[0], hspace=space[1])
    axes = list(np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel())
    for ax in axes[n:]:
        ax.set_axis_off()
    return fig, axes[:n]


def _finite(values: Sequence[Any]) -> np.ndarray:
    return np.array([v if isinstance(v, int | float) and math.isfinite(v) else np.nan for v in values], float)


def results_figure(history: History, eval_keys: Sequence[str]) -> Figure:
    """One panel per loss, the LR, img/s (against optimizer steps) and per evaluation number in ``eval_keys``
    (every split: val, val2), at the step it was computed."""
    losses = history.loss_keys()
    panels: list[str] = [*losses, "lr", "img_per_s", *eval_keys]
    fig, axes = _grid(len(panels), 4, (3.6, 2.8))
    steps = np.array([int(e["step"]) for e in history.train])
    # one step axis for every panel: a lone evaluation sits where it happened in training, not mid-panel
    every = [*steps.tolist(), *(int(e["step"]) for events in history.evals.values() for e in events)]
    for ax, key in zip(axes, panels):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if every:
            ax.set_xlim(*_padded(min(every), max(every)))
        if key in eval_keys:
            for split, events in history.evals.items():
                y = _finite([e.get(key) for e in events])
                y[y < 0] = np.nan  # COCO's -1: nothing to score, not a score
                ax.plot([int(e["step"]) for e in events], y, "o-", label=split, markersize=4)
            ax.set_title(f"eval {key}")
            ax.set_ylim(bottom=0)
            if len(history.evals) > 1:
                ax.legend(fontsize=8)
            if not history.evals:
                ax.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=ax.transAxes)
            continue
        series = {key: _finite([e.get(key) for e in history.train])}
        if key == "lr" and any("lr_bias" in e for e in history.train):
            series["lr_bias"] = _finite([e.get("lr_bias") for e in history.train])
        for name, y in series.items():
            ax.plot(steps, y, linewidth=1, label=name, alpha=0.5 if key in losses else 1.0)
            if key in losses and len(y) >= 10:  # the trend through the noise of single log windows
                ax.plot(steps, _smooth(y), linewidth=1.5, color="C1", label="smoothed")
        ax.set_title({"img_per_s": "img/s", "lr": "learning rate"}.get(key, key))
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
            if len(series) > 1:
                ax.legend(fontsize=8)
        if not len(steps):
            ax.text(0.5, 0.5, "no training steps logged yet", ha="center", va="center", transform=ax.transAxes)
    return fig


def _padded(lo: int, hi: int) -> tuple[float, float]:
    pad = max(hi - lo, 1) * 0.05
    return lo - pad, hi + pad


def _smooth(y: np.ndarray) -> np.ndarray:
    """A centred moving average over ~5% of the points (NaNs, e.g. a skipped window, left out of each mean)."""
    w = max(3, len(y) // 20) | 1
    ok = np.isfinite(y)
    kernel = np.ones(w)
    num = np.convolve(np.where(ok, y, 0.0), kernel, mode="same")
    den = np.convolve(ok.astype(float), kernel, mode="same")
    return np.divide(num, den, out=np.full(len(y), np.nan), where=den > 0)


def pr_figure(result: dict[str, Any], title: str) -> Figure:
    """Precision-recall at IoU 0.5 per class, from an evaluation's ``pr50`` (the COCOeval precision array at
    evaluation time) and ``pr50_all``, the mean curve; AP@0.5 in the legend. Classes without ground truth
    (a list of None: COCOeval's -1 at every recall) are not drawn."""
    pr = result["pr50"]
    recall = np.asarray(pr["recall"], dtype=float)
    per_class = result.get("per_class") or {}
    fig = new_figure(7.5, 6)
    ax = fig.add_subplot()
    names = [n for n, p in pr["precision"].items() if p is not None and any(v is not None for v in p)]
    many = len(names) > MAX_LEGEND
    for name in names:
        ap50 = (per_class.get(name) or {}).get("AP50")
        label = None if many else f"{name} {_num(ap50)}"
        ax.plot(recall, _finite(pr["precision"][name]), linewidth=1, label=label,
                **({"color": "grey", "alpha": 0.4} if many else {}))
    if any(v is not None for v in result.get("pr50_all") or []):
        ax.plot(recall, _finite(result["pr50_all"]), linewidth=3, color="C0" if many else "black",
                label=f"all classes mAP@0.5 {_num(result.get('AP50'))}")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision", title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, borderaxespad=0)
    return fig


def _num(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) and math.isfinite(value) and value >= 0 else "-"


def confusion_figure(cm: ConfusionMatrix) -> Figure:
    """Counts and row-normalised side by side; rows the truth, columns the prediction, background last."""
    labels = cm.labels
    n = len(labels)
    side = min(max(4.0, 0.45 * n + 2.0), 16.0)
    fig = new_figure(2 * side + 1.5, side)
    for ax, data, what in zip(fig.subplots(1, 2), (cm.matrix, cm.normalized()), ("counts", "row-normalised")):
        shown = np.log1p(data) if what == "counts" else data  # a big diagonal would wash out the confusions
        ax.imshow(shown, cmap="Blues", vmin=0, vmax=max(float(shown.max()), 1e-9) if what == "counts" else 1.0)
        ax.set_xticks(range(n), labels, rotation=90 if n > 8 else 45, ha="right" if n <= 8 else "center",
                      fontsize=8)
        ax.set_yticks(range(n), labels, fontsize=8)
        ax.set_xlabel("prediction")
        ax.set_ylabel("ground truth")
        ax.set_title(f"{what} (conf >= {cm.conf:g}, IoU >= {cm.iou:g})")
        if n <= MAX_ANNOTATED:
            cut = 0.6 * float(shown.max() if what == "counts" else 1.0)
            for (i, j), v in np.ndenumerate(data):
                if v:
                    ax.text(j, i, f"{v:d}" if what == "counts" else f"{v:.2f}", ha="center", va="center",
                            fontsize=7, color="white" if shown[i, j] > cut else "black")
    if cm.ignored:
        fig.suptitle(f"{cm.ignored} detection(s) matched only ignored (difficult / crowd) boxes: not counted",
                     fontsize=9)
    return fig


@dataclass
class LabelStats:
    """What the training split holds: instances per class (every image) and, for a sample of images, each
    box's centre and size as fractions of its image, and its aspect ratio (w / h, in pixels)."""

    class_names: list[str]
    counts: np.ndarray  # (K,) instances per class
    labels: np.ndarray  # (n,) 1..K of the sampled boxes
    boxes: np.ndarray  # (n, 4) cx, cy, w, h in [0, 1]
    aspect: np.ndarray  # (n,)
    images: int  # images in the split
    sampled: int  # images the geometry comes from


def labels_figure(stats: LabelStats) -> Figure:
    fig = new_figure(11, 8.5)
    (ax_c, ax_xy), (ax_wh, ax_ar) = fig.subplots(2, 2)
    k = len(stats.class_names)
    colours = _class_colours(k)
    ax_c.bar(range(k), stats.counts, color=[colours[i] for i in range(k)])
    ax_c.set_xticks(range(k), stats.class_names, rotation=90 if k > 8 else 0, fontsize=8)
    ax_c.set_title(f"instances per class ({int(stats.counts.sum())} in {stats.images} train images)")
    of = "" if stats.sampled == stats.images else f", {stats.sampled} of {stats.images} images"
    if len(stats.boxes):
        if len(stats.boxes) > 5000:  # a density; a scatter of that many points is one blot
            ax_xy.hist2d(stats.boxes[:, 0], stats.boxes[:, 1], bins=50, range=[[0, 1], [0, 1]], cmap="Blues",
                         cmin=1)
        else:
            ax_xy.scatter(stats.boxes[:, 0], stats.boxes[:, 1], s=4, alpha=0.5,
                          c=[colours[int(i) - 1] for i in stats.labels])
        bins = np.linspace(0, 1, 51)
        ax_wh.hist(stats.boxes[:, 2], bins=bins, alpha=0.6, label="width")
        ax_wh.hist(stats.boxes[:, 3], bins=bins, alpha=0.6, label="height")
        ax_wh.legend(fontsize=8)
        ratio = stats.aspect[np.isfinite(stats.aspect) & (stats.aspect > 0)]
        if len(ratio):
            lo, hi = np.log2(ratio.min()), np.log2(ratio.max())
            ax_ar.hist(ratio, bins=np.exp2(np.linspace(min(lo, -1), max(hi, 1), 41)))
            ax_ar.set_xscale("log", base=2)
    ax_xy.set(xlim=(0, 1), ylim=(1, 0), xlabel="x", ylabel="y", title=f"box centres (fraction of image{of})")
    ax_xy.set_aspect("equal")
    ax_wh.set(xlabel="fraction of image side", title="box width and height")
    ax_ar.set(xlabel="aspect ratio w / h (pixels)", title="box aspect ratio")
    return fig


def _class_colours(k: int) -> list[tuple[float, ...]]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if k <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(k)]


@dataclass
class Shown:
    """One image of the prediction grid: pixels (H, W, C uint8), its record (original pixels) and a title."""

    image: np.ndarray
    record: dict[str, Any]
    title: str


def predictions_figure(shown: Sequence[Shown], class_names: Sequence[str], conf: float) -> Figure:
    """Ground truth (white, dashed) and predictions at ``conf`` or above (class colour, with score)."""
    fig, axes = _grid(max(len(shown), 1), 4, (3.2, 3.4), margins=(0.05, 0.05, 0.05, 0.45), space=(0.05, 0.12))
    colours = _class_colours(len(class_names))
    for ax, item in zip(axes, shown):
        img = item.image
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None)
        rec = item.record
        for box in np.asarray(rec["gt_boxes"]).reshape(-1, 4):
            ax.add_patch(_rect(box, "white", "--"))
        keep = np.asarray(rec["scores"]) >= conf
        for box, score, label in zip(np.asarray(rec["boxes"])[keep], np.asarray(rec["scores"])[keep],
                                     np.asarray(rec["labels"])[keep]):
            colour = colours[int(label) - 1]
            ax.add_patch(_rect(box, colour, "-"))
            ax.text(box[0], box[1], f"{class_names[int(label) - 1]} {score:.2f}", fontsize=6, va="bottom",
                    color="white", bbox={"facecolor": colour, "edgecolor": "none", "pad": 0.5, "alpha": 0.8})
        ax.set_title(item.title, fontsize=7)
        ax.set_axis_off()
    if not shown:
        axes[0].text(0.5, 0.5, "no val images", ha="center", va="center", transform=axes[0].transAxes)
        axes[0].set_axis_off()
    fig.suptitle(f"val: ground truth (white, dashed) and predictions with score >= {conf:g}", fontsize=10,
                 y=1 - 0.12 / fig.get_figheight())
    return fig


def _rect(box: np.ndarray, colour: Any, style: str) -> Rectangle:
    x0, y0, x1, y1 = (float(v) for v in box)
    return Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linestyle=style, linewidth=1.2)
