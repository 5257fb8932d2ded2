"""SSD-lite detectors (Sandler et al. 2018 §6.3: SSD with depthwise-separable heads) on torchvision
backbones built with ``weights=None`` (never a download; local weights are loaded by models/weights.py).

Feature maps at strides 8/16/32 from the backbone plus one extra block at stride 64: at img_dim 128-160
that is 16x16 ... 2x2 (20x20 ... 3x3), enough for objects from ~10 px to the whole image, and the
extra layers torchvision's SSD300 stacks down to 1x1 would only cost time on such small inputs.
Backbone submodules keep torchvision's names: ``net.backbone.`` + a torchvision state-dict key
(``features.*`` of MobileNetV3, ``conv1``/``layer*`` of ResNet-18; their classifiers are dropped).
With ``model.backbone = "timm:<name>"`` both names build the same SSD-lite head on that timm net
(models/timm_backbone.py, ``net.backbone.body.`` + timm's keys), with as many extra blocks as it takes to
reach four maps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn
from torchvision.models import mobilenet_v3_large, mobilenet_v3_small, resnet18
from torchvision.ops.misc import Conv2dNormActivation

from accel_det.catalog import (  # noqa: F401  (SSD_SIZE_FRACTIONS: re-exported)
    MOBILENET_V3_STAGES,
    RESNET18_STAGES,
    SSD_SIZE_FRACTIONS,
    SSD_STRIDES,
    ssd_anchors,
)
from accel_det.config import AnchorConfig, Recipe
from accel_det.models.base import MODELS
from accel_det.models.native import AnchorDetector, build_anchor_detector, flatten_heads
from accel_det.models.recompute import run_stage
from accel_det.models.timm_backbone import TimmBackbone


def default_ssd_anchors(img_dim: int) -> AnchorConfig:
    """Anchors scaled with img_dim (at 128: 10/18, 28/41, 58/77, 100/122 px; 6 priors per cell), from
    the catalog (SSD_SIZE_FRACTIONS): validation fills unset [model.anchors] keys from the same table."""
    return AnchorConfig(**ssd_anchors(img_dim))


def _norm(c: int) -> nn.Module:
    return nn.BatchNorm2d(c, eps=0.001)  # eps of torchvision's MobileNetV3/SSDlite


def set_bn_momentum(module: nn.Module, momentum: float = 0.1) -> None:
    """torchvision's MobileNetV3 uses TF's BN momentum 0.01, tuned for 600-epoch ImageNet runs. On a
    short from-scratch run its running stats lag the weights by ~100 steps and eval-mode BN collapses:
    the CPU demo scored COCO AP50 0.03 in eval mode vs 0.87 with batch statistics. PyTorch's 0.1
    tracks the weights within ~20 steps and costs nothing on long runs."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum


def separable_head(cin: int, cout: int) -> nn.Sequential:
    """SSDLite prediction layer: depthwise 3x3 + BN + ReLU6, then a pointwise 1x1 to the outputs."""
    return nn.Sequential(
        Conv2dNormActivation(cin, cin, 3, groups=cin, norm_layer=_norm, activation_layer=nn.ReLU6),
        nn.Conv2d(cin, cout, 1),
    )


def extra_block(cin: int, cout: int) -> nn.Sequential:
    """Downsample 2x cheaply: 1x1 reduce, depthwise 3x3 stride 2, 1x1 expand (torchvision ssdlite)."""
    mid = cout // 2
    return nn.Sequential(
        Conv2dNormActivation(cin, mid, 1, norm_layer=_norm, activation_layer=nn.ReLU6),
        Conv2dNormActivation(mid, mid, 3, stride=2, groups=mid, norm_layer=_norm, activation_layer=nn.ReLU6),
        Conv2dNormActivation(mid, cout, 1, norm_layer=_norm, activation_layer=nn.ReLU6),
    )


class MobileNetV3Taps(nn.Module):
    """MobileNetV3 ``features`` returning the last block at strides 8, 16 and 32."""

    # index of the last block of each stride in torchvision's features (checked by the tests)
    TAPS = {"large": (6, 12, 16), "small": (3, 8, 12)}
    # index of the last block of each stage (strides 2, 4, 8, 16, 32): model.recompute's units
    STAGE_ENDS = {"large": (1, 3, 6, 12, 16), "small": (0, 1, 3, 8, 12)}
    stage_names = MOBILENET_V3_STAGES

    def __init__(self, arch: str = "large", channels: int = 3) -> None:
        super().__init__()
        body = (mobilenet_v3_large if arch == "large" else mobilenet_v3_small)(weights=None)
        self.features = body.features
        if channels != 3:
            stem = self.features[0][0]
            self.features[0][0] = nn.Conv2d(channels, stem.out_channels, 3, stride=2, padding=1, bias=False)
        self.taps = self.TAPS[arch]
        self.features = self.features[: self.taps[-1] + 1]
        self.out_channels = [self.features[i].out_channels for i in self.taps]
        self.strides = [8, 16, 32]
        self.stage_ends = self.STAGE_ENDS[arch]
        self.recompute = 0  # the first N stages are recomputed in backward (models/recompute.py)

    def _blocks(self, start: int, end: int, x: torch.Tensor) -> torch.Tensor:
        # indexes self.features at call time: a SyncBatchNorm conversion replaces modules after __init__
        for i in range(start, end + 1):
            x = self.features[i](x)
        return x

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs, start = [], 0
        for s, end in enumerate(self.stage_ends):
            x = run_stage(self, partial(self._blocks, start, end), x, s < self.recompute)
            if end in self.taps:
                outs.append(x)
            start = end + 1
        return outs


class ResNet18Taps(nn.Module):
    """ResNet-18 returning layer2/3/4 (strides 8, 16, 32); no avgpool/fc (unused params upset DDP)."""

    stage_names = RESNET18_STAGES

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        body = resnet18(weights=None)
        self.conv1 = (
            body.conv1 if channels == 3 else nn.Conv2d(channels, 64, 7, stride=2, padding=3, bias=False)
        )
        self.bn1, self.relu, self.maxpool = body.bn1, body.relu, body.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            body.layer1,
            body.layer2,
            body.layer3,
            body.layer4,
        )
        self.out_channels = [128, 256, 512]
        self.strides = [8, 16, 32]
        self.recompute = 0  # the first N stages are recomputed in backward (models/recompute.py)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for s, stage in enumerate((self._stem, self.layer1, self.layer2, self.layer3, self.layer4)):
            x = run_stage(self, stage, x, s < self.recompute)
            outs.append(x)
        return outs[2:]  # layer2, layer3, layer4


class SSDLiteNet(nn.Module):
    """Backbone taps + extra blocks + separable heads -> (loc (N, P, 4), conf (N, P, K+1))."""

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        num_anchors: list[int],
        extra_channels: Sequence[int] = (256,),
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        chans = list(backbone.out_channels)
        self.strides = list(backbone.strides)
        self.extras = nn.ModuleList()
        for c in extra_channels:
            self.extras.append(extra_block(chans[-1], c))
            chans.append(c)
            self.strides.append(self.strides[-1] * 2)
        if len(num_anchors) != len(chans):
            raise ValueError(
                f"this SSD-lite has {len(chans)} feature maps; the anchors define {len(num_anchors)}"
            )
        self.loc = nn.ModuleList(separable_head(c, a * 4) for c, a in zip(chans, num_anchors, strict=True))
        self.conf = nn.ModuleList(
            separable_head(c, a * (num_classes + 1)) for c, a in zip(chans, num_anchors, strict=True)
        )
        set_bn_momentum(self)

    def classification_convs(self) -> list[nn.Conv2d]:
        return [head[-1] for head in self.conf]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.backbone(x)
        for block in self.extras:
            feats.append(block(feats[-1]))
        loc = flatten_heads([head(f) for head, f in zip(self.loc, feats, strict=True)], 4)
        conf = flatten_heads(
            [head(f) for head, f in zip(self.conf, feats, strict=True)], self.num_classes + 1
        )
        return loc, conf


def _build(recipe: Recipe, make_backbone: Callable[[int], nn.Module]) -> AnchorDetector:
    # validation completes [model.anchors] from ssd_anchors(img_dim); None only if validation was skipped
    anchors = recipe.model.anchors or default_ssd_anchors(recipe.model.img_dim)
    k, c, spec = recipe.num_classes, recipe.model.channels, recipe.model.backbone
    if spec:
        make_backbone = partial(TimmBackbone, spec, recipe.model.name)

    def make_net(num_anchors: list[int]) -> SSDLiteNet:
        backbone = make_backbone(c)
        # one extra block per map the backbone lacks (native: strides 8/16/32 + one at 64)
        extras = (256,) * max(len(SSD_STRIDES) - len(backbone.out_channels), 0)
        return SSDLiteNet(backbone, k, num_anchors, extras)

    return build_anchor_detector(recipe, make_net, anchors)


@MODELS.register("ssdlite_mobilenet_v3")
def build_ssdlite_mobilenet_v3(recipe: Recipe) -> AnchorDetector:
    """SSD-lite on MobileNetV3-Large (width 1.0, so torchvision's ImageNet weights fit)."""
    return _build(recipe, lambda c: MobileNetV3Taps("large", channels=c))


@MODELS.register("ssdlite_resnet18")
def build_ssdlite_resnet18(recipe: Recipe) -> AnchorDetector:
    """SSD-lite heads on ResNet-18: heavier than MobileNetV3 but dense convs run well on CPU."""
    return _build(recipe, lambda c: ResNet18Taps(channels=c))
