"""Train/val pipelines from torchvision.transforms.v2: they move boxes together with pixels.

Samples are ``(tv_tensors.Image, target)``; v2 transforms the Image and the BoundingBoxes and passes the
plain tensors (labels, difficult) and python values (image_id, orig_size) through untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten
from torchvision import tv_tensors
from torchvision.transforms import v2

# Applied in this order whatever the recipe's order: colour first (it works on the original pixels),
# then SSD's zoom-out (expand onto a mean-colour canvas) before the IoU crop, so crops can also come from
# the zoomed-out canvas (the SSD paper's recipe), then the flip.
AUGMENT_ORDER = ("photometric", "zoom_out", "iou_crop", "hflip")

# ImageNet mean in uint8: zoom-out fills with it so the padding looks like "average image", not black.
MEAN_RGB = (123, 117, 104)
MEAN_GRAY = 117


def sanitize_labels_getter(sample: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The tensors SanitizeBoundingBoxes must filter together with the boxes."""
    target = sample[1]
    return target["labels"], target["difficult"]


class IoUCropIfBoxes(nn.Module):
    """RandomIoUCrop, skipped for images without boxes: its sampler needs a box centre inside the crop and
    would spin through its trials until it draws the keep-as-is option."""

    def __init__(self) -> None:
        super().__init__()
        self.crop = v2.RandomIoUCrop()

    def forward(self, *inputs: Any) -> Any:
        sample = inputs if len(inputs) > 1 else inputs[0]
        leaves, _ = tree_flatten(sample)
        boxes = [x for x in leaves if isinstance(x, tv_tensors.BoundingBoxes)]
        if not boxes or boxes[0].shape[0] == 0:
            return sample
        return self.crop(*inputs)


def _augment(name: str, channels: int) -> nn.Module:
    if name == "photometric":
        return v2.RandomPhotometricDistort(p=0.5)
    if name == "zoom_out":
        fill = MEAN_GRAY if channels == 1 else MEAN_RGB
        return v2.RandomZoomOut(fill={tv_tensors.Image: fill, "others": 0}, side_range=(1.0, 4.0), p=0.5)
    if name == "iou_crop":
        return IoUCropIfBoxes()
    if name == "hflip":
        return v2.RandomHorizontalFlip(p=0.5)
    raise AssertionError(name)  # pragma: no cover - names are checked by build_transforms


def build_transforms(train: bool, img_dim: int, augments: Sequence[str], channels: int = 3) -> v2.Compose:
    """``train``: the named augments (in AUGMENT_ORDER), resize to a square, drop degenerate boxes.
    Val: the resize only; every ground-truth box survives, degenerate or not, because the evaluator
    needs them all (and flags, not drops, difficult ones)."""
    unknown = [a for a in augments if a not in AUGMENT_ORDER]
    if unknown:
        raise ValueError(
            f"unknown augment(s) {', '.join(map(repr, unknown))}; known: {', '.join(AUGMENT_ORDER)}"
        )
    steps: list[nn.Module] = []
    if train:
        steps += [_augment(name, channels) for name in AUGMENT_ORDER if name in augments]
    # A square stretch, not letterbox: what FaceBoxes/SSD train with, and every image of a batch gets the
    # same shape so collate can stack them. antialias=True keeps small objects from aliasing away.
    steps.append(v2.Resize((img_dim, img_dim), antialias=True))
    if train:
        steps.append(v2.SanitizeBoundingBoxes(min_size=1, labels_getter=sanitize_labels_getter))
    return v2.Compose(steps)
