"""Train/val pipelines from torchvision.transforms.v2: they move boxes together with pixels.

Samples are ``(tv_tensors.Image, target)``; v2 transforms the Image and the BoundingBoxes and passes the
plain tensors (labels, difficult) and python values (image_id, orig_size) through untouched.

Model input. Every image ends as an ``img_dim`` square: stretched (the default; what FaceBoxes/SSD train
with) or, with ``data.letterbox``, scaled by one factor and padded centred with the mean colour (MindYOLO's
``rect``). ``to_original`` maps boxes in model-input pixels back to the original image for either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten
from torchvision import tv_tensors
from torchvision.ops import box_iou
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from accel_det.config_data import AUGMENTS

from .mosaic import Mosaic

# Applied in this order whatever the recipe's order (config_data.Augment lists them so): the mosaic first (it
# makes the image the others work on: mosaic.py), colour next (on the whole image), then SSD's zoom-out (expand
# onto a mean-colour canvas) before the IoU crop, so crops can also come from the zoomed-out canvas (the SSD
# paper's recipe), then the scale jitter of what is left, then the flips.
AUGMENT_ORDER: tuple[str, ...] = AUGMENTS

# ImageNet mean in uint8: zoom-out, scale jitter and letterbox fill with it so the padding looks like "average
# image", not black.
MEAN_RGB = (123, 117, 104)
MEAN_GRAY = 117

# scale_jitter: YOLO's random scale gain (hyp "scale: 0.5")
SCALE_RANGE = (0.5, 1.5)


def sanitize_labels_getter(sample: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The tensors SanitizeBoundingBoxes must filter together with the boxes."""
    target = sample[1]
    return target["labels"], target["difficult"]


def _sample_of(inputs: tuple[Any, ...]) -> Any:
    return inputs if len(inputs) > 1 else inputs[0]


class BatchedIoUCrop(v2.RandomIoUCrop):
    """torchvision's RandomIoUCrop (SSD's sampler: draw a minimum IoU among ``options``, then up to ``trials``
    random crops; the first that keeps a box centre and reaches that IoU with one of those boxes wins; if none
    does, draw another minimum) with the trials of several option draws made and tested as one batch of tensors.

    The first valid crop of a sequence of i.i.d. draws has the same distribution whether the draws are tested one
    by one or all at once, so the augmentation is the same; only the random stream is consumed differently. The
    speed is not: the one-by-one loop spent ~70 % of the SSD augment set's time in Python, a few tensor ops per
    trial (benchmarks/data_pipeline.py)."""

    draws_per_batch = 4  # option draws tested together: fewest tensor ops per crop (8x faster than one by one)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        # check_inputs made sure there are boxes; v2 keeps their canvas_size equal to the image's size
        boxes = next(x for x in flat_inputs if isinstance(x, tv_tensors.BoundingBoxes))
        orig_h, orig_w = boxes.canvas_size
        xyxy = F.convert_bounding_box_format(
            boxes.as_subclass(torch.Tensor), boxes.format, tv_tensors.BoundingBoxFormat.XYXY
        ).reshape(-1, 4)
        cx, cy = 0.5 * (xyxy[:, 0] + xyxy[:, 2]), 0.5 * (xyxy[:, 1] + xyxy[:, 3])
        options = torch.tensor(self.options)
        k, n = self.draws_per_batch, self.trials
        while True:
            min_iou = options[torch.randint(low=0, high=len(self.options), size=(k,))]  # (k,)
            u = torch.rand(k, n, 4)
            scale = self.min_scale + (self.max_scale - self.min_scale) * u[..., :2]
            # .long() truncates like the int() of the one-by-one sampler
            new_w, new_h = (orig_w * scale[..., 0]).long(), (orig_h * scale[..., 1]).long()  # (k, n)
            left, top = ((orig_w - new_w) * u[..., 2]).long(), ((orig_h - new_h) * u[..., 3]).long()
            right, bottom = left + new_w, top + new_h
            aspect = new_w / new_h.clamp(min=1)
            ok = (new_w > 0) & (new_h > 0) & (aspect >= self.min_aspect_ratio) & (aspect <= self.max_aspect_ratio)
            within = (  # (k, n, boxes): box centres inside each crop
                (left[..., None] < cx) & (cx < right[..., None]) & (top[..., None] < cy) & (cy < bottom[..., None])
            )
            crops = torch.stack([left, top, right, bottom], dim=-1).to(xyxy.dtype).reshape(-1, 4)
            ious = box_iou(crops, xyxy).reshape(k, n, -1).masked_fill(~within, -1.0)  # only kept centres count
            ok &= within.any(dim=-1) & (ious.max(dim=-1).values >= min_iou[:, None])
            # the draws in order: the first that is keep-as-is (>= 1) or has a valid trial decides
            decided = (min_iou >= 1.0) | ok.any(dim=1)
            if not decided.any():
                continue
            d = int(decided.nonzero()[0, 0])
            if min_iou[d] >= 1.0:
                return {}
            t = int(ok[d].nonzero()[0, 0])
            return {"top": int(top[d, t]), "left": int(left[d, t]), "height": int(new_h[d, t]),
                    "width": int(new_w[d, t]), "is_within_crop_area": within[d, t]}


class IoUCropIfBoxes(nn.Module):
    """The IoU crop, skipped for images without boxes: its sampler needs a box centre inside the crop and
    would spin through its trials until it draws the keep-as-is option."""

    def __init__(self) -> None:
        super().__init__()
        self.crop = BatchedIoUCrop()

    def forward(self, *inputs: Any) -> Any:
        leaves, _ = tree_flatten(_sample_of(inputs))
        boxes = [x for x in leaves if isinstance(x, tv_tensors.BoundingBoxes)]
        if not boxes or boxes[0].shape[0] == 0:
            return _sample_of(inputs)
        return self.crop(*inputs)


@dataclass(frozen=True)
class LetterboxGeometry:
    """Where an ``h x w`` image lands in the ``img_dim`` square: resized to ``new_h x new_w`` (one scale,
    rounded to whole pixels), then ``top``/``left`` pixels of padding before it."""

    new_h: int
    new_w: int
    top: int
    left: int

    @staticmethod
    def of(orig_hw: tuple[int, int], img_dim: int) -> LetterboxGeometry:
        h, w = orig_hw
        scale = min(img_dim / h, img_dim / w)
        new_h = min(img_dim, max(1, round(h * scale)))
        new_w = min(img_dim, max(1, round(w * scale)))
        return LetterboxGeometry(new_h, new_w, (img_dim - new_h) // 2, (img_dim - new_w) // 2)


class Letterbox(nn.Module):
    """Scale to fit ``img_dim`` keeping the aspect ratio, pad centred to the square with ``fill``."""

    def __init__(self, img_dim: int, fill: int | tuple[int, ...]) -> None:
        super().__init__()
        self.img_dim = img_dim
        self.fill = {tv_tensors.Image: fill, "others": 0}

    def forward(self, *inputs: Any) -> Any:
        leaves, _ = tree_flatten(_sample_of(inputs))
        # v2's rule: the Image, or else the first plain tensor, is the image
        image = next((x for x in leaves if isinstance(x, tv_tensors.Image)), None)
        if image is None:
            image = next(x for x in leaves if type(x) is torch.Tensor)
        h, w = image.shape[-2:]
        g = LetterboxGeometry.of((int(h), int(w)), self.img_dim)
        right, bottom = self.img_dim - g.new_w - g.left, self.img_dim - g.new_h - g.top
        steps = v2.Compose([
            v2.Resize((g.new_h, g.new_w), antialias=True),
            v2.Pad([g.left, g.top, right, bottom], fill=self.fill),
        ])
        return steps(*inputs)


def to_original(boxes: torch.Tensor, orig_hw: tuple[int, int], img_dim: int, letterbox: bool) -> torch.Tensor:
    """Boxes (n, 4) xyxy in model-input pixels (the ``img_dim`` square) -> pixels of the ``orig_hw`` image.

    Plain resize: each axis scaled back (as before letterbox existed, no clipping: the input square is the
    whole image). Letterbox: the padding subtracted, each axis divided by the scale its resize really applied
    (``new_w / w``, ``new_h / h``: the one scale up to the rounding to whole pixels, and what makes the round
    trip exact), then clipped to the image, since a box may reach into the padding. Pure: evaluation and
    ``predict`` both call it."""
    h, w = orig_hw
    boxes = boxes.float()
    if not letterbox:
        return boxes * boxes.new_tensor([w / img_dim, h / img_dim, w / img_dim, h / img_dim])
    g = LetterboxGeometry.of((h, w), img_dim)
    shift = boxes.new_tensor([g.left, g.top, g.left, g.top])
    scale = boxes.new_tensor([w / g.new_w, h / g.new_h, w / g.new_w, h / g.new_h])
    out = (boxes - shift) * scale
    out[:, 0::2] = out[:, 0::2].clamp(0, w)
    out[:, 1::2] = out[:, 1::2].clamp(0, h)
    return out


def _fill(channels: int) -> int | tuple[int, ...]:
    return MEAN_GRAY if channels == 1 else MEAN_RGB


def _augment(name: str, channels: int) -> nn.Module:
    fill = {tv_tensors.Image: _fill(channels), "others": 0}
    if name == "photometric":
        return v2.RandomPhotometricDistort(p=0.5)
    if name == "color_jitter":
        # YOLO's HSV gains (hsv_v 0.4, hsv_s 0.7, hsv_h 0.015); saturation and hue leave 1-channel images alone
        return v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.7, hue=0.015)
    if name == "grayscale":
        # keeps the channel count, so a batch still stacks
        return v2.RandomGrayscale(p=0.1)
    if name == "zoom_out":
        return v2.RandomZoomOut(fill=fill, side_range=(1.0, 4.0), p=0.5)
    if name == "iou_crop":
        return IoUCropIfBoxes()
    if name == "scale_jitter":
        # Scale about the centre on the same canvas (YOLO's random scale): objects really change size in the
        # model input. v2.ScaleJitter/RandomResize change the canvas instead, which the final resize to img_dim
        # would undo. A pure scale maps boxes exactly; parts pushed off the canvas are clipped, and boxes left
        # without area are dropped by SanitizeBoundingBoxes.
        return v2.RandomAffine(degrees=0.0, scale=SCALE_RANGE, interpolation=v2.InterpolationMode.BILINEAR,
                               fill=fill)
    if name == "hflip":
        return v2.RandomHorizontalFlip(p=0.5)
    if name == "vflip":
        return v2.RandomVerticalFlip(p=0.5)
    raise AssertionError(name)  # pragma: no cover - names are checked by build_transforms


def build_transforms(
    train: bool, img_dim: int, augments: Sequence[str], channels: int = 3, letterbox: bool = False
) -> v2.Compose | Mosaic:
    """``train``: the named augments (in AUGMENT_ORDER), to the ``img_dim`` square, drop degenerate boxes; with
    ``"mosaic"``, a ``Mosaic`` in front of that (the dataset gives it the partners: mosaic.py). Val: to the
    square only; every ground-truth box survives, degenerate or not, because the evaluator needs them all (and
    flags, not drops, difficult ones). ``letterbox``: keep the aspect ratio and pad instead of stretching."""
    unknown = [a for a in augments if a not in AUGMENT_ORDER]
    if unknown:
        raise ValueError(
            f"unknown augment(s) {', '.join(map(repr, unknown))}; known: {', '.join(AUGMENT_ORDER)}"
        )
    steps: list[nn.Module] = []
    if train:
        steps += [_augment(name, channels) for name in AUGMENT_ORDER if name in augments and name != "mosaic"]
    # Every image of a batch gets the same shape so collate can stack them. antialias=True keeps small objects
    # from aliasing away.
    steps.append(Letterbox(img_dim, _fill(channels)) if letterbox else v2.Resize((img_dim, img_dim), antialias=True))
    if not train:
        return v2.Compose(steps)
    sanitize = v2.SanitizeBoundingBoxes(min_size=1, labels_getter=sanitize_labels_getter)
    steps.append(sanitize)
    if "mosaic" in augments:
        # the same drop right after the mosaic: the next augments (the IoU crop's box centres) see no box that
        # the clipping to the mosaic's edge left without area
        return Mosaic(v2.Compose(steps), img_dim, _fill(channels), sanitize)
    return v2.Compose(steps)
