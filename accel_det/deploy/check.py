"""The export command's proof: run the written file on a few val images and compare with the eager model.

Batch 1 (each image alone) and batch 4 (four different images together: an image's detections must not
depend on the others), or the fixed batch the graph was exported with; with ``--dynamic-size`` also at a
second, non-square size. Any mismatch (deploy/compare.py) is an :class:`ExportError`, not a warning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from accel_det.deploy import ExportError
from accel_det.deploy.compare import Comparison, compare_batch
from accel_det.deploy.runner import ExportedDetector
from accel_det.errors import AccelDetError

CHECK_IMAGES = 4


@dataclass
class CheckReport:
    runs: list[str] = field(default_factory=list)  # "batch 1 at 128x128", ...
    total: Comparison = field(default_factory=Comparison)
    source: str = ""  # where the images came from
    note: str = ""

    def summary(self) -> str:
        t = self.total
        ties = ((t.swaps, "NMS near-tie swaps"), (t.cuts, "max_det near-tie cuts"))
        extra = "".join(f", {n} {what}" for n, what in ties if n)
        return f"equal to eager on {self.source}: {'; '.join(self.runs)} ({t.matched} detections matched{extra})"


def check_images(recipe: Any, count: int = CHECK_IMAGES) -> tuple[torch.Tensor, str, str]:
    """``count`` different val images as the model sees them: float (count, C, img_dim, img_dim) in [0, 1].

    Loaded and resized exactly as ``predict`` does. Fewer val images are topped up with flipped copies (still
    different content); without a readable val split, seeded noise images stand in (and the note says so)."""
    from accel_det.data import build_dataset, eval_transforms, load_image

    resize = eval_transforms(recipe)
    try:
        ds = build_dataset(recipe, "val")
        picks = torch.linspace(0, len(ds) - 1, min(count, len(ds))).round().long().tolist()
        # a record's pixels may live inside a dataset file (hf) rather than at its path
        sources = [ds.records[i].path if ds.records[i].image is None else ds.records[i].image for i in picks]
        images = [resize(load_image(s, recipe.model.channels)).float().div(255) for s in sources]
    except AccelDetError as exc:
        images, source = [], ""
        note = f"the val images could not be read ({exc}); checked on seeded noise images instead"
    else:
        source, note = f"{len(images)} val images", ""
    if not images:
        dim, c = recipe.model.img_dim, recipe.model.channels
        g = torch.Generator().manual_seed(0)
        return torch.rand(count, c, dim, dim, generator=g), f"{count} noise images", note
    i = 0
    while len(images) < count:  # flips: new content, same statistics
        images.append(images[i].flip(-1) if i % 2 == 0 else images[i].flip(-2))
        i += 1
    return torch.stack(images), source, note


def _check_one(model: nn.Module, exported: ExportedDetector, x: torch.Tensor, batch: int, iou: float,
               max_det: int) -> Comparison:
    total = Comparison()
    for start in range(0, x.shape[0], batch):
        chunk = x[start:start + batch]
        if chunk.shape[0] < batch:
            break
        with torch.no_grad():
            eager = model(chunk)
        names = [f"check image {start + i}" for i in range(batch)]
        total.add(compare_batch(eager, exported(chunk), iou, max_det, names))
    return total


def check_export(path: Path, model: nn.Module, recipe: Any, meta: dict[str, Any]) -> CheckReport:
    """Run ``path`` against the eager ``model``; raise :class:`ExportError` on the first mismatch."""
    exported = ExportedDetector(path, device="cpu")
    x, source, note = check_images(recipe)
    report = CheckReport(source=source, note=note)
    batches = [1, CHECK_IMAGES] if exported.batch is None else [exported.batch]
    sizes = [x]
    if meta["input"]["dynamic_size"]:
        lo, dim = meta["input"]["min_side"], recipe.model.img_dim
        # a second size, not square, not a multiple of the strides
        hw = (max(lo, dim + lo // 2 + 1), max(lo, dim * 3 // 2 + 3))
        sizes.append(F.interpolate(x, size=hw, mode="bilinear", align_corners=False).clamp(0, 1))
    iou, max_det = meta["iou_thres"], meta["max_det"]
    for xs in sizes:
        if exported.batch is not None and xs.shape[0] < exported.batch:  # a big fixed batch: repeat the images
            xs = xs.repeat((exported.batch + xs.shape[0] - 1) // xs.shape[0], 1, 1, 1)[: exported.batch]
        for b in batches:
            c = _check_one(model, exported, xs, b, iou, max_det)
            if c.problem:
                raise ExportError(f"{path}: differs from the eager model at batch {b}, "
                                  f"{xs.shape[-2]}x{xs.shape[-1]}: {c.problem}")
            report.total.add(c)
            report.runs.append(f"batch {b} at {xs.shape[-2]}x{xs.shape[-1]}")
    if report.total.matched == 0:
        report.note = (report.note + "; " if report.note else "") + (
            f"no detection above conf_thres {meta['conf_thres']} on the check images: only empty outputs were compared")
    return report
