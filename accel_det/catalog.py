"""The registered detectors, and what a recipe is checked against for each native one, without torch.

``accel-det validate`` must not import torch, so the facts it needs about the nets live here as plain
data: the model names (tests/test_models.py asserts they equal the registry's), the feature strides of
each native net (tests/test_config.py builds the nets and compares), and each native model's default
anchors for an ``img_dim``. The builders in ``accel_det.models`` read the same defaults from here.

With ``model.backbone = "timm:<name>"`` the native heads sit on a timm backbone: the head taps the levels
timm reports (:func:`head_taps`), and validation derives the strides from a small table of timm names'
feature reductions (``TIMM_BACKBONES``; any other name is assumed to be the usual CNN pyramid, and the
built model checks it).
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
# Native models without anchors (models/anchor_free.py): no [model.anchors]; strides and recompute stages below
ANCHOR_FREE_MODELS = ("afdet_mobilenet_v3",)
KNOWN_MODELS = NATIVE_MODELS + ANCHOR_FREE_MODELS + TORCHVISION_MODELS

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


def ssd_anchors(img_dim: int, strides: tuple[int, ...] = SSD_STRIDES) -> dict[str, Any]:
    """Anchors scaled with img_dim (at 128: 10/18, 28/41, 58/77, 100/122 px; 6 priors per cell).
    No densification: these anchors are already >= 1.25x their stride. ``strides``: another backbone's
    (a timm one), still four maps: the sizes are per map, not per stride."""
    return {
        "min_sizes": [[round(f * img_dim, 1) for f in level] for level in SSD_SIZE_FRACTIONS],
        "steps": list(strides),
        "aspect_ratios": [[2.0] for _ in strides],
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


@dataclass(frozen=True)
class AnchorFreeInfo:
    """What validation needs to know about an anchor-free net (its own backbone only)."""

    strides: tuple[int, ...]
    stages: tuple[str, ...]


ANCHOR_FREE_INFO: dict[str, AnchorFreeInfo] = {
    "afdet_mobilenet_v3": AnchorFreeInfo((8, 16, 32), MOBILENET_V3_STAGES),
}


def feature_strides(name: str, backbone: str = "") -> tuple[int, ...]:
    """Strides of a native model's feature maps, on its own backbone or on ``backbone`` ("timm:<name>");
    KeyError for a torchvision or unknown model, ValueError for a backbone the head cannot use."""
    if name in ANCHOR_FREE_INFO:
        return ANCHOR_FREE_INFO[name].strides
    info = NATIVE_INFO[name]
    if not backbone:
        return info.strides
    reductions = timm_backbone_info(backbone).reductions
    strides = [reductions[i] for i in head_taps(name, reductions)]
    while len(strides) < len(info.strides):  # SSD-lite's extra blocks, each at twice the stride
        strides.append(strides[-1] * 2)
    return tuple(strides)


def default_anchors(name: str, img_dim: int, strides: tuple[int, ...] | None = None) -> dict[str, Any]:
    """A native model's default ``[model.anchors]`` table at ``img_dim``, every key filled; ``strides``: its
    feature strides on another backbone (:func:`feature_strides`)."""
    if strides is None or name == "faceboxes":  # FaceBoxes' heads keep 32/64/128 on any backbone
        return NATIVE_INFO[name].default_anchors(img_dim)
    return ssd_anchors(img_dim, strides)


# ------------------------------------------------------------------------------------------ timm backbones

TIMM_PREFIX = "timm:"
# A timm model name, optionally with a pretrained tag ("resnet18.a1_in1k"). Nothing else: "hf-hub:..." or a
# path would make timm fetch a config from the network, and backbones are never downloaded.
TIMM_NAME = r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?"

# (native model, backbone) pairs that tests/test_every_model_run.py trains, evaluates and serves like the
# registered models: one per head, on a backbone that is fast at 64-128 px
TIMM_EXAMPLES: tuple[tuple[str, str], ...] = (
    ("ssdlite_mobilenet_v3", "timm:mobilenetv3_small_050"),
    ("faceboxes", "timm:mobilenetv3_small_050"),
)


@dataclass(frozen=True)
class TimmBackboneInfo:
    """What validation needs to know about a timm backbone (``features_only``, timm's default out_indices)."""

    reductions: tuple[int, ...]  # model.feature_info.reduction(), one per level
    # timm wraps the net in its generic FeatureListNet, whose modules accel_det runs level by level: each
    # level is a model.recompute stage. Nets with their own feature class (MobileNetV3, EfficientNet) run
    # as one call, so they have no stages to recompute.
    stages: bool


_CNN = (2, 4, 8, 16, 32)
# tests/test_timm_backbone.py builds each of these and compares
TIMM_BACKBONES: dict[str, TimmBackboneInfo] = {
    **{n: TimmBackboneInfo(_CNN, True) for n in ("resnet10t", "resnet18", "resnet34", "resnet50", "regnetx_002",
                                                  "ghostnet_100")},
    **{n: TimmBackboneInfo(_CNN, False) for n in ("mobilenetv3_small_050", "mobilenetv3_small_100",
                                                   "mobilenetv3_large_100", "mobilenetv4_conv_small",
                                                   "efficientnet_b0", "efficientnet_lite0", "lcnet_050")},
    **{n: TimmBackboneInfo((4, 8, 16, 32), True) for n in ("convnext_atto", "convnext_tiny")},
    "vgg11": TimmBackboneInfo((1, 2, 4, 8, 16, 32), True),
}
# any other name: the usual CNN pyramid is assumed here, and the built model checks its real reductions
ASSUMED_TIMM_BACKBONE = TimmBackboneInfo(_CNN, True)


def timm_model_name(backbone: str) -> str:
    """ "timm:resnet18.a1_in1k" -> "resnet18.a1_in1k" (what timm.create_model takes)."""
    return backbone.removeprefix(TIMM_PREFIX)


def timm_backbone_known(backbone: str) -> bool:
    """Whether validation knows ``backbone``'s strides (else they are assumed, and checked when built)."""
    return timm_model_name(backbone).split(".")[0] in TIMM_BACKBONES


def timm_backbone_info(backbone: str) -> TimmBackboneInfo:
    """The table's entry for ``backbone`` ("timm:<name>[.tag]"), or the assumed CNN pyramid."""
    return TIMM_BACKBONES.get(timm_model_name(backbone).split(".")[0], ASSUMED_TIMM_BACKBONE)


def head_taps(name: str, reductions: tuple[int, ...] | list[int]) -> list[int]:
    """Which of a backbone's levels (indices into ``reductions``) a native head predicts on.

    FaceBoxes: the stride-32 level, where its RDCL + Inceptions end (conv3/conv4 then make 64 and 128).
    SSD-lite: the last level of each stride >= 8 (as the native nets: finer maps cost the heads more than
    the small objects they add), at most its four maps; extra blocks continue at twice the stride up to
    four maps. ValueError when no level fits.
    """
    last = {r: i for i, r in enumerate(reductions)}  # the last level of each reduction
    if name == "faceboxes":
        if 32 not in last:
            raise ValueError(f"FaceBoxes' heads need a stride-32 level; the backbone's are {list(reductions)}")
        return [last[32]]
    taps = [last[r] for r in sorted(last) if r >= 8][: len(NATIVE_INFO[name].strides)]
    if not taps:
        raise ValueError(f"SSD-lite needs levels at stride >= 8; the backbone's are {list(reductions)}")
    return taps


def backbone_stages(name: str, backbone: str) -> int | None:
    """model.recompute's limit on a timm backbone: the levels up to the head's last tap, or None when the
    net has no stages (TimmBackboneInfo.stages)."""
    info = timm_backbone_info(backbone)
    return head_taps(name, info.reductions)[-1] + 1 if info.stages else None
