"""The ``"mosaic"`` training augment (YOLOv4, Bochkovskiy et al. 2020, section 3.3): four training images in one,
so a step sees objects at more scales, in more contexts, and more objects per image.

It is dataset-level, not a per-sample v2 transform: sample i needs three more samples. ``build_transforms`` puts a
``Mosaic`` in front of the rest of the training pipeline; ``DetectionDataset`` sees it and hands it a loader of
other indices. Everything random (the partners, the centre, the part scales, the crop) is drawn from the global
CPU generator that the dataset has seeded from (``train.seed``, epoch, i), like every other augment, so the mosaic
is the same whatever ``num_workers`` and after a resume.

The geometry. On a ``2S`` square canvas (``S`` = ``model.img_dim``) a centre is drawn in ``[0.5 S, 1.5 S]`` on each
axis; i goes to the top-left of it, the partners to the top-right, bottom-left and bottom-right, each resized
keeping its aspect ratio so its long side is ``S`` times a gain drawn in ``MOSAIC_SCALE``, each touching the centre
with its corner; the rest of the canvas is the mean colour. Then a square window of side ``[S, 2S]`` that holds the
centre (so all four parts show) is cut out and resized to ``S``: the mosaic is an ordinary ``S x S`` image, and the
other augments and the final resize run on it as on any image. The canvas is never built: each part is resized
once, straight to its size in the output, and pasted where the window puts it (the same image up to the rounding
to whole pixels, without painting and resizing a canvas four times the output's area). Parts never overlap (each
stays on its side of the centre).

Boxes move with their part (one scale and shift per part, applied to all boxes at once), are clipped to the
output, and those left without area are dropped by the pipeline's own ``SanitizeBoundingBoxes``. The target is
i's (``image_id``, ``orig_size``, ``file``) with the four parts' boxes, labels and ``difficult`` flags.

Partners come from the sample's own set: with ``[data.mix]`` each set mosaics within itself (``MixedDataset``
holds two datasets, each with its own pipeline and seed), so ``mix.rate`` stays the share of images from the second
set, and a set's bad-sample policy applies to its own images only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

Target = dict[str, Any]
Sample = tuple[tv_tensors.Image, Target]

# The long side of a part, as a fraction of img_dim: YOLO's random scale gain, as transforms.SCALE_RANGE. With the
# window's own [1/2, 1] scale, objects end between 1/4 and 1.5 of their size in a plain (stretched) sample.
MOSAIC_SCALE = (0.5, 1.5)


@dataclass(frozen=True)
class MosaicDraw:
    """One mosaic's random choices, in canvas pixels (the ``2S`` canvas): the three partner indices, the centre,
    the four parts' long side over ``S`` (i's first), and the window (left, top, side) cut out and resized to
    ``S``."""

    partners: tuple[int, int, int]
    centre: tuple[float, float]
    scales: tuple[float, float, float, float]
    window: tuple[float, float, float]


def draw_mosaic(n: int, size: int) -> MosaicDraw:
    """A draw for a set of ``n`` samples and ``img_dim`` ``size``, from the global CPU generator (the dataset
    seeds it per sample). Partners are uniform over the set (i itself included: it is one of ``n``)."""
    partners = torch.randint(n, (3,)).tolist()
    u = torch.rand(9, dtype=torch.float64).tolist()
    xc, yc = size * (0.5 + u[0]), size * (0.5 + u[1])
    lo, hi = MOSAIC_SCALE
    scales = [lo + (hi - lo) * v for v in u[2:6]]
    side = size * (1.0 + u[6])

    def start(c: float, v: float) -> float:  # the window's left (top) edge: the window holds c, inside the canvas
        a, b = max(0.0, c - side), min(c, 2 * size - side)
        return a + (b - a) * v

    left, top = start(xc, u[7]), start(yc, u[8])
    return MosaicDraw(
        (partners[0], partners[1], partners[2]), (xc, yc), (scales[0], scales[1], scales[2], scales[3]),
        (left, top, side),
    )


def _xyxy(target: Target) -> torch.Tensor:
    boxes = target["boxes"]
    return F.convert_bounding_box_format(
        boxes.as_subclass(torch.Tensor), boxes.format, tv_tensors.BoundingBoxFormat.XYXY
    ).reshape(-1, 4).float()


def combine(parts: Sequence[Sample], draw: MosaicDraw, size: int, fill: int | Sequence[int]) -> Sample:
    """The ``size x size`` mosaic of ``parts`` (i, then its three partners: top-left, top-right, bottom-left,
    bottom-right of the centre) under ``draw``; boxes clipped to the image, degenerate ones left in (the caller's
    ``SanitizeBoundingBoxes`` drops them)."""
    if len(parts) != 4:
        raise ValueError(f"a mosaic has 4 parts, got {len(parts)}")
    image0, target0 = parts[0]
    channels = image0.shape[-3]
    canvas = torch.empty(channels, size, size, dtype=image0.dtype)
    canvas[:] = torch.as_tensor(fill, dtype=image0.dtype).reshape(-1, 1, 1)
    left, top, side = draw.window
    k = size / side  # canvas pixels -> output pixels
    cx, cy = round((draw.centre[0] - left) * k), round((draw.centre[1] - top) * k)
    params = torch.zeros(4, 4)  # per part: x scale, y scale, x shift, y shift of its boxes
    for j, ((image, _), gain) in enumerate(zip(parts, draw.scales, strict=True)):
        h, w = int(image.shape[-2]), int(image.shape[-1])
        r = gain * size / max(h, w) * k
        ph, pw = max(1, round(h * r)), max(1, round(w * r))
        x0 = cx - pw if j in (0, 2) else cx
        y0 = cy - ph if j in (0, 1) else cy
        params[j] = torch.tensor([pw / w, ph / h, x0, y0])
        ox0, oy0, ox1, oy1 = max(x0, 0), max(y0, 0), min(x0 + pw, size), min(y0 + ph, size)
        if ox1 <= ox0 or oy1 <= oy0:  # the window left this part out
            continue
        part = F.resize(image.as_subclass(torch.Tensor), [ph, pw], antialias=True)
        canvas[:, oy0:oy1, ox0:ox1] = part[:, oy0 - y0 : oy1 - y0, ox0 - x0 : ox1 - x0]

    targets = [t for _, t in parts]
    boxes = [_xyxy(t) for t in targets]
    which = torch.repeat_interleave(torch.arange(4), torch.tensor([len(b) for b in boxes]))
    p = params[which]
    out = torch.cat(boxes) * p[:, [0, 1, 0, 1]] + p[:, [2, 3, 2, 3]]
    out = out.clamp(0, size)
    target = dict(target0)  # i's image_id, orig_size, file
    target["boxes"] = tv_tensors.BoundingBoxes(out, format="XYXY", canvas_size=(size, size))
    target["labels"] = torch.cat([t["labels"] for t in targets])
    target["difficult"] = torch.cat([t["difficult"] for t in targets])
    return tv_tensors.Image(canvas), target


class Mosaic(nn.Module):
    """The training pipeline with ``"mosaic"``: the mosaic, its ``sanitize`` (the pipeline's own
    ``SanitizeBoundingBoxes``), then ``rest`` (the other augments and the resize). ``DetectionDataset`` calls
    ``apply`` with its loader of partners; called as a plain v2 transform (no dataset to draw partners from) the
    four parts are the sample itself."""

    def __init__(self, rest: nn.Module, size: int, fill: int | Sequence[int], sanitize: nn.Module) -> None:
        super().__init__()
        self.rest, self.size, self.fill, self.sanitize = rest, size, fill, sanitize

    def apply(
        self, image: tv_tensors.Image, target: Target, n: int, load: Callable[[int], Sample | None],
        draw: MosaicDraw | None = None,
    ) -> Sample:
        """Sample i (``image``, ``target``) mosaicked with three of the ``n`` samples that ``load`` returns
        (``None``: that partner could not be read; i stands in for it); ``draw``: given instead of drawn."""
        draw = draw_mosaic(n, self.size) if draw is None else draw
        parts: list[Sample] = [(image, target)]
        for j in draw.partners:
            got = load(j)
            parts.append((image, target) if got is None else got)
        sample = self.sanitize(*combine(parts, draw, self.size, self.fill))
        return self.rest(*sample)

    def forward(self, image: tv_tensors.Image, target: Target) -> Sample:
        return self.apply(image, target, 1, lambda _: (image, target))
