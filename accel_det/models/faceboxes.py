"""FaceBoxes (Zhang et al. 2017, "FaceBoxes: A CPU Real-time Face Detector with High Accuracy").

RDCL (Rapidly Digested Convolutional Layers): conv1 7x7/4 and conv2 5x5/2 with CReLU, each followed by a
3x3/2 max pool, shrink the input 32x in four cheap steps; CReLU (Shang et al. 2016) halves the conv's
output channels because early filters come in +/- pairs. MSCL (Multiple Scale Convolutional Layers):
three Inception blocks, then conv3/conv4 at strides 64/128; detection layers at strides 32/64/128.

Submodule names follow the public FaceBoxes.PyTorch (zisianw), so its ``FaceBoxes`` state dict loads
into ``net`` (``net.`` + its keys) when ``num_classes`` = 1 and ``channels`` = 3 and the default anchors.

With ``model.backbone = "timm:<name>"`` a timm net's stride-32 level replaces RDCL + Inceptions (the
``backbone``); conv3/conv4, the heads and the densified anchors stay FaceBoxes'.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from accel_det.catalog import FACEBOXES_STAGES
from accel_det.config import AnchorConfig, Recipe
from accel_det.models.base import MODELS
from accel_det.models.native import AnchorDetector, build_anchor_detector, flatten_heads
from accel_det.models.recompute import run_stage
from accel_det.models.timm_backbone import TimmBackbone


class BasicConv2d(nn.Module):
    """Conv (no bias: BN follows) + BN + ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1, padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class CRelu(nn.Module):
    """Conv + BN, then ReLU(concat(x, -x)): ``cout`` filters give ``2 * cout`` channels."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int, padding: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return F.relu(torch.cat([x, -x], dim=1), inplace=True)


class Inception(nn.Module):
    """The paper's Fig. 2(b) block: four 32-channel branches (1x1; pool+1x1; 1x1+3x3; 1x1+3x3+3x3)."""

    def __init__(self) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(128, 32, 1)
        self.branch1x1_2 = BasicConv2d(128, 32, 1)
        self.branch3x3_reduce = BasicConv2d(128, 24, 1)
        self.branch3x3 = BasicConv2d(24, 32, 3, padding=1)
        self.branch3x3_reduce_2 = BasicConv2d(128, 24, 1)
        self.branch3x3_2 = BasicConv2d(24, 32, 3, padding=1)
        self.branch3x3_3 = BasicConv2d(32, 32, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch1x1_2(pooled),
                self.branch3x3(self.branch3x3_reduce(x)),
                self.branch3x3_3(self.branch3x3_2(self.branch3x3_reduce_2(x))),
            ],
            dim=1,
        )


class FaceBoxesNet(nn.Module):
    """Raw FaceBoxes: images -> (loc (N, P, 4), conf (N, P, K+1))."""

    strides = (32, 64, 128)
    # model.recompute's units: RDCL conv1 (+ pool), conv2 (+ pool), inception1..3 (all before the first head)
    stage_names = FACEBOXES_STAGES

    def __init__(
        self, num_classes: int, num_anchors: list[int], channels: int = 3, backbone: nn.Module | None = None
    ) -> None:
        super().__init__()
        if len(num_anchors) != 3:
            raise ValueError(f"FaceBoxes has 3 detection layers; the anchors define {len(num_anchors)}")
        self.num_classes = num_classes
        if backbone is None:
            self.conv1 = CRelu(channels, 24, 7, stride=4, padding=3)
            self.conv2 = CRelu(48, 64, 5, stride=2, padding=2)
            self.inception1 = Inception()
            self.inception2 = Inception()
            self.inception3 = Inception()
            c32 = 128
        else:  # one map at stride 32 (models/timm_backbone.py); the stages to recompute are its own
            if list(backbone.strides) != [32]:
                raise ValueError(f"FaceBoxes needs a backbone's stride-32 map, got strides {list(backbone.strides)}")
            self.backbone = backbone
            c32 = backbone.out_channels[0]
        self.conv3_1 = BasicConv2d(c32, 128, 1)
        self.conv3_2 = BasicConv2d(128, 256, 3, stride=2, padding=1)
        self.conv4_1 = BasicConv2d(256, 128, 1)
        self.conv4_2 = BasicConv2d(128, 256, 3, stride=2, padding=1)
        cins = (c32, 256, 256)
        self.loc = nn.ModuleList(
            nn.Conv2d(c, a * 4, 3, padding=1) for c, a in zip(cins, num_anchors, strict=True)
        )
        self.conf = nn.ModuleList(
            nn.Conv2d(c, a * (num_classes + 1), 3, padding=1) for c, a in zip(cins, num_anchors, strict=True)
        )
        self.recompute = 0  # the first N stages are recomputed in backward (models/recompute.py)

    def _rdcl1(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(self.conv1(x), kernel_size=3, stride=2, padding=1)

    def _rdcl2(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(self.conv2(x), kernel_size=3, stride=2, padding=1)

    def classification_convs(self) -> list[nn.Conv2d]:
        return list(self.conf)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if hasattr(self, "backbone"):
            s1 = self.backbone(x)[0]
        else:
            # modules looked up per call: a SyncBatchNorm conversion replaces them after __init__
            stages = (self._rdcl1, self._rdcl2, self.inception1, self.inception2, self.inception3)
            for s, stage in enumerate(stages):
                x = run_stage(self, stage, x, s < self.recompute)
            s1 = x
        s2 = self.conv3_2(self.conv3_1(s1))
        s3 = self.conv4_2(self.conv4_1(s2))
        feats = (s1, s2, s3)
        loc = flatten_heads([head(f) for head, f in zip(self.loc, feats, strict=True)], 4)
        conf = flatten_heads(
            [head(f) for head, f in zip(self.conf, feats, strict=True)], self.num_classes + 1
        )
        return loc, conf


@MODELS.register("faceboxes")
def build_faceboxes(recipe: Recipe) -> AnchorDetector:
    """FaceBoxes; default anchors = the paper's (AnchorConfig's defaults): 32/64/128 densified 4x/2x/1x
    on stride 32, 256 on stride 64, 512 on stride 128 (21 + 1 + 1 anchors per cell, 21824 at 1024 px)."""
    # validation completes [model.anchors] from the paper's; None only if validation was skipped
    anchors = recipe.model.anchors or AnchorConfig()
    k, c, spec = recipe.num_classes, recipe.model.channels, recipe.model.backbone

    def make_net(num_anchors: list[int]) -> FaceBoxesNet:
        backbone = TimmBackbone(spec, "faceboxes", c) if spec else None
        return FaceBoxesNet(k, num_anchors, channels=c, backbone=backbone)

    return build_anchor_detector(recipe, make_net, anchors)
