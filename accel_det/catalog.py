"""The registered detectors, and what a recipe is checked against for each native one, without torch.

``accel-det validate`` must not import torch, so the facts it needs about the nets live here as plain
data: the model names (tests/test_models.py asserts they equal the registry's), the feature strides of
each native net (tests/test_config.py builds the nets and compares), and each native model's default
anchors for an ``img_dim``. The builders in ``accel_det.models`` read the same defaults from here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

NATIVE_MODELS = ("faceboxes", "ssdlite_mobilenet_v3", "ssdlite_resnet18")
TORCHVISION_MODELS = (
    "tv_ssdlite320_mobilenet_v3_large",
    "tv_ssd300_vgg16",
    "tv_fasterrcnn_mobilenet_v3_large_320_fpn",
    "tv_retinanet_resnet50_fpn_v2",
    "tv_fcos_resnet50_fpn",
)
KNOWN_MODELS = NATIVE_MODELS + TORCHVISION_MODELS

# Shared by every native model: the SSD box-coder variances and unclipped priors.
DEFAULT_VARIANCE = (0.1, 0.2)

# FaceBoxes (Zhang et al. 2017 §3.3): 32/64/128 px anchors on the stride-32 map (densified 4x/2x/1x),
# 256 on stride 64, 512 on stride 128. Fixed in pixels: the paper trains at 1024 px.
FACEBOXES_STRIDES = (32, 64, 128)
FACEBOXES_MIN_SIZES = ((32.0, 64.0, 128.0), (256.0,), (512.0,))

# SSD-lite: MobileNetV3/ResNet-18 taps at strides 8/16/32 plus one extra block at 64 (models/ssd.py).
# Anchor sizes are fractions of img_dim, per feature map, each with aspect ratios 2 and 1/2.
# Consecutive sizes differ by <= 1.7x, so any square object overlaps some square prior with
# IoU >= 1/1.7^2 = 0.35 (model.match_iou's default) before position error.
SSD_STRIDES = (8, 16, 32, 64)
SSD_SIZE_FRACTIONS = ((0.08, 0.14), (0.22, 0.32), (0.45, 0.6), (0.78, 0.95))


def faceboxes_anchors(img_dim: int | None = None) -> dict[str, Any]:
    """The paper's anchors (AnchorConfig's own defaults); the same at every img_dim."""
    return {
        "min_sizes": [list(level) for level in FACEBOXES_MIN_SIZES],
        "steps": list(FACEBOXES_STRIDES),
        "aspect_ratios": [],
        "densify": True,
        "variance": DEFAULT_VARIANCE,
        "clip": False,
    }


def ssd_anchors(img_dim: int) -> dict[str, Any]:
    """Anchors scaled with img_dim (at 128: 10/18, 28/41, 58/77, 100/122 px; 6 priors per cell).
    No densification: these anchors are already >= 1.25x their stride."""
    return {
        "min_sizes": [[round(f * img_dim, 1) for f in level] for level in SSD_SIZE_FRACTIONS],
        "steps": list(SSD_STRIDES),
        "aspect_ratios": [[2.0] for _ in SSD_STRIDES],
        "densify": False,
        "variance": DEFAULT_VARIANCE,
        "clip": False,
    }


@dataclass(frozen=True)
class NativeModelInfo:
    """What validation needs to know about a native net."""

    strides: tuple[int, ...]  # of each feature map the heads predict on, in the priors' order
    default_anchors: Callable[[int], dict[str, Any]]  # img_dim -> a complete [model.anchors] table
    # backbone stages in forward order, the units model.recompute counts (tests/test_native_models.py
    # checks the nets have these)
    stages: tuple[str, ...] = ()


# Recompute stages. FaceBoxes: the two RDCL convs (each with its max pool) and the three Inceptions, i.e. all
# of it before the first detection layer. MobileNetV3: ``features`` cut where the stride doubles. ResNet-18:
# the stem (conv1 + bn1 + relu + maxpool) and layer1..4. The early stages hold the largest activations.
FACEBOXES_STAGES = ("conv1", "conv2", "inception1", "inception2", "inception3")
MOBILENET_V3_STAGES = ("features.0-1", "features.2-3", "features.4-6", "features.7-12", "features.13-16")
RESNET18_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")

NATIVE_INFO: dict[str, NativeModelInfo] = {
    "faceboxes": NativeModelInfo(FACEBOXES_STRIDES, faceboxes_anchors, FACEBOXES_STAGES),
    "ssdlite_mobilenet_v3": NativeModelInfo(SSD_STRIDES, ssd_anchors, MOBILENET_V3_STAGES),
    "ssdlite_resnet18": NativeModelInfo(SSD_STRIDES, ssd_anchors, RESNET18_STAGES),
}


def feature_strides(name: str) -> tuple[int, ...]:
    """Strides of a native model's feature maps (KeyError for a torchvision or unknown model)."""
    return NATIVE_INFO[name].strides


def default_anchors(name: str, img_dim: int) -> dict[str, Any]:
    """A native model's default ``[model.anchors]`` table at ``img_dim``, every key filled."""
    return NATIVE_INFO[name].default_anchors(img_dim)
