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


def _register(name: str, fn: Callable[..., nn.Module], **kwargs: Any) -> None:
    def build(recipe: Any) -> nn.Module:
        return fn(weights=None, weights_backbone=None, num_classes=recipe.num_classes + 1,
                  **_kwargs(recipe, **kwargs))

    build.__doc__ = f"torchvision.models.detection.{fn.__name__}, randomly initialised"
    MODELS.register(name)(build)


_register("tv_ssdlite320_mobilenet_v3_large", tvd.ssdlite320_mobilenet_v3_large, resize=False)
_register("tv_ssd300_vgg16", tvd.ssd300_vgg16, resize=False)
_register("tv_fasterrcnn_mobilenet_v3_large_320_fpn", tvd.fasterrcnn_mobilenet_v3_large_320_fpn, prefix="box_")
_register("tv_retinanet_resnet50_fpn_v2", tvd.retinanet_resnet50_fpn_v2)
_register("tv_fcos_resnet50_fpn", tvd.fcos_resnet50_fpn)
