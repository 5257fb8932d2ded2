"""torchvision detectors, registered with ``weights=None, weights_backbone=None``: nothing is ever downloaded.

torchvision counts the background in ``num_classes`` (labels 1..K, 0 = background) for every detector here,
so we pass K + 1. Each model resizes internally (GeneralizedRCNNTransform) and maps its boxes back to the
size of the image it was given, so outputs are in input-image pixels as the contract asks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torchvision.models import detection as tvd

from accel_det.models.base import MODELS


def _rcnn_like_kwargs(recipe: Any) -> dict[str, Any]:
    # min_size = max_size = img_dim: the data pipeline already resized to a square img_dim, so the
    # internal resize is the identity instead of upscaling to torchvision's 800 px default.
    ev = recipe.eval
    return {
        "min_size": recipe.model.img_dim,
        "max_size": recipe.model.img_dim,
        "score_thresh": ev.conf_thres,
        "nms_thresh": ev.iou_thres,
        "detections_per_img": ev.max_det,
    }


def _ssd_kwargs(recipe: Any) -> dict[str, Any]:
    ev = recipe.eval
    # topk_candidates >= max_det, or max_det could never be reached
    return {
        "score_thresh": ev.conf_thres,
        "nms_thresh": ev.iou_thres,
        "detections_per_img": ev.max_det,
        "topk_candidates": max(ev.max_det, 400),
    }


def _register(name: str, fn: Callable[..., nn.Module], kwargs: Callable[[Any], dict[str, Any]]) -> None:
    def build(recipe: Any) -> nn.Module:
        return fn(weights=None, weights_backbone=None, num_classes=recipe.num_classes + 1, **kwargs(recipe))

    build.__doc__ = f"torchvision.models.detection.{fn.__name__}, randomly initialised"
    MODELS.register(name)(build)


def _fasterrcnn_kwargs(recipe: Any) -> dict[str, Any]:
    ev = recipe.eval
    return {
        "min_size": recipe.model.img_dim,
        "max_size": recipe.model.img_dim,
        "box_score_thresh": ev.conf_thres,
        "box_nms_thresh": ev.iou_thres,
        "box_detections_per_img": ev.max_det,
    }


_register("tv_ssdlite320_mobilenet_v3_large", tvd.ssdlite320_mobilenet_v3_large, _ssd_kwargs)
_register("tv_ssd300_vgg16", tvd.ssd300_vgg16, _ssd_kwargs)
_register("tv_fasterrcnn_mobilenet_v3_large_320_fpn", tvd.fasterrcnn_mobilenet_v3_large_320_fpn, _fasterrcnn_kwargs)
_register("tv_retinanet_resnet50_fpn_v2", tvd.retinanet_resnet50_fpn_v2, _rcnn_like_kwargs)
_register("tv_fcos_resnet50_fpn", tvd.fcos_resnet50_fpn, _rcnn_like_kwargs)
