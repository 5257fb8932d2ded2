"""torchvision detectors, registered with ``weights=None, weights_backbone=None``: nothing is ever downloaded.

Classes: our labels are 1..K everywhere (docs/architecture.md, Contracts). The softmax-head detectors (SSD,
SSDlite, Faster R-CNN) have an explicit background class 0, so they are built with ``num_classes = K + 1``.
The sigmoid-head ones (RetinaNet, FCOS) score each of their ``num_classes`` outputs independently, with no
background output: built with K + 1 they would spend a logit on a class that never occurs and could still
emit label 0. They are built with K outputs instead and shift labels at the boundary
(:class:`LabelsFromOne`).

Each model resizes internally (GeneralizedRCNNTransform) and maps its boxes back to the size of the image
it was given, so outputs are in input-image pixels as the contract asks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torchvision.models import detection as tvd

from accel_det.models.base import MODELS


class LabelsFromOne(nn.Module):
    """Mixin for torchvision's sigmoid-head detectors: targets 1..K in, detections 1..K out.

    Their class ``c`` is output ``c`` (0-based), so targets get ``labels - 1`` before torchvision sees
    them and detections get ``labels + 1``. It adds no parameter or buffer: the state dict keeps
    torchvision's keys, so a checkpoint of the plain torchvision model loads with ``load_weights``.
    """

    def forward(self, images: Any, targets: list[dict[str, Any]] | None = None) -> Any:
        if targets is not None:
            # new dicts and tensors: the caller's targets (the data loader's batch) stay untouched
            targets = [{**t, "labels": torch.as_tensor(t["labels"]) - 1} for t in targets]
        out = super().forward(images, targets)
        if self.training:  # the losses
            return out
        return [{**det, "labels": det["labels"] + 1} for det in out]


class RetinaNetK(LabelsFromOne, tvd.RetinaNet):
    """torchvision RetinaNet with K sigmoid outputs and labels 1..K."""


class FCOSK(LabelsFromOne, tvd.FCOS):
    """torchvision FCOS with K sigmoid outputs and labels 1..K."""


def _kwargs(recipe: Any, *, prefix: str = "", resize: bool = True) -> dict[str, Any]:
    """The recipe's post-processing knobs under the names each torchvision detector uses."""
    ev = recipe.eval
    kw: dict[str, Any] = {
        f"{prefix}score_thresh": ev.conf_thres,
        f"{prefix}nms_thresh": ev.iou_thres,
        f"{prefix}detections_per_img": ev.max_det,
    }
    if resize:
        # min_size = max_size = img_dim: the data pipeline already resized to a square img_dim, so the
        # internal resize is the identity instead of upscaling to torchvision's 800 px default.
        kw.update(min_size=recipe.model.img_dim, max_size=recipe.model.img_dim)
    else:
        # SSD resizes to its fixed size; topk_candidates >= max_det, or max_det could never be reached
        kw["topk_candidates"] = max(ev.max_det, 400)
    return kw


def _register(
    name: str, fn: Callable[..., nn.Module], *, sigmoid_as: type[nn.Module] | None = None, **kwargs: Any
) -> None:
    """Register ``fn``; ``sigmoid_as``: the :class:`LabelsFromOne` subclass of a sigmoid-head detector."""

    def build(recipe: Any) -> nn.Module:
        num_classes = recipe.num_classes if sigmoid_as else recipe.num_classes + 1
        model = fn(weights=None, weights_backbone=None, num_classes=num_classes, **_kwargs(recipe, **kwargs))
        if sigmoid_as is not None:
            # torchvision's builder assembles backbone, anchors and head; the subclass only changes
            # forward and adds no state, so swapping the class of the built model is safe
            base = sigmoid_as.__bases__[-1]
            if type(model) is not base:
                raise TypeError(f"{fn.__name__} built a {type(model).__name__}, expected {base.__name__}")
            model.__class__ = sigmoid_as
        return model

    build.__doc__ = f"torchvision.models.detection.{fn.__name__}, randomly initialised"
    MODELS.register(name)(build)


_register("tv_ssdlite320_mobilenet_v3_large", tvd.ssdlite320_mobilenet_v3_large, resize=False)
_register("tv_ssd300_vgg16", tvd.ssd300_vgg16, resize=False)
_register("tv_fasterrcnn_mobilenet_v3_large_320_fpn", tvd.fasterrcnn_mobilenet_v3_large_320_fpn, prefix="box_")
_register("tv_retinanet_resnet50_fpn_v2", tvd.retinanet_resnet50_fpn_v2, sigmoid_as=RetinaNetK)
_register("tv_fcos_resnet50_fpn", tvd.fcos_resnet50_fpn, sigmoid_as=FCOSK)
