"""An anchor-free detector in the GFL / TOOD style: ``net`` + ``criterion`` + ``postprocess`` (DETR-style split).

``net``: MobileNetV3-Large taps at strides 8/16/32 -> a light PAN neck (top-down then bottom-up, depthwise-separable
convs) -> decoupled heads per level: K sigmoid class logits and, per side (l, t, r, b), ``reg_max + 1`` logits of
a discrete distribution over the distance from the cell centre to that side in stride units (GFL §3.3, "general
distribution": the box is the expectation, and a spread-out distribution says where the edge is ambiguous).
No anchors: each cell's centre ``(j + 0.5) * stride`` is one point (:func:`anchor_points`), and the criterion
(losses/anchor_free.py) decides which points learn which object from the predictions themselves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms
from torchvision.ops.misc import Conv2dNormActivation

from accel_det.config import Recipe
from accel_det.errors import RecipeError
from accel_det.losses.anchor_free import (
    CLS_LOSSES,
    TaskAlignedLoss,
    anchor_points,
    decode_distances,
    distribution_to_distances,
)
from accel_det.models.base import MODELS
from accel_det.models.init import init_weights
from accel_det.models.native import register_normalisation, stack_images
from accel_det.models.recompute import set_recompute
from accel_det.models.ssd import MobileNetV3Taps, set_bn_momentum

__all__ = [
    "AnchorFreeDetector",
    "AnchorFreeNet",
    "AnchorFreePostProcess",
    "anchor_points",
    "decode_distances",
    "distribution_to_distances",
]

# The demo recipe (AdamW 6e-3; this head wants ~2.4e-2: recipes/photos_afdet.toml), 15 epochs, seed 0, COCO AP /
# AP50 (another seed moved AP by up to 0.2, so these are hints): 64 channels 0.29 / 0.51, 96: 0.44 / 0.65, 128:
# 0.39 / 0.61. The 1x1 laterals squeeze 112-160 backbone channels; at 64 the class branch starves (that model placed
# boxes well, IoU 0.7-0.9, but confused the shapes' classes).
NECK_CHANNELS = 96
# The same check, epoch 5 / 10 / 15 AP at 96 channels: vfl 0.20 / 0.39 / 0.44, qfl 0.08 / 0.32 / 0.36 (at 64:
# vfl 0.12 / 0.25 / 0.29, qfl 0.06 / 0.20 / 0.23). VFL keeps the positives' full weight (GFL's QFL focally
# down-weights them too), which a few hundred steps seem to need.
DEFAULT_CLS_LOSS = "vfl"
HEAD_DEPTH = 1  # depthwise-separable convs per branch and level
REG_MAX = 16  # GFL's default: distances 0..16 strides, i.e. up to 512 px on the stride-32 map


def _norm(c: int) -> nn.Module:
    return nn.BatchNorm2d(c, eps=0.001)


def _sep(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """Depthwise 3x3 + pointwise 1x1, each with BN + Hardswish (MobileNetV3's activation)."""
    return nn.Sequential(
        Conv2dNormActivation(cin, cin, 3, stride=stride, groups=cin, norm_layer=_norm,
                             activation_layer=nn.Hardswish),
        Conv2dNormActivation(cin, cout, 1, norm_layer=_norm, activation_layer=nn.Hardswish),
    )


class PAN(nn.Module):
    """Path aggregation (Liu et al. 2018): top-down (upsample + add) then bottom-up (stride-2 conv + add)."""

    def __init__(self, in_channels: Sequence[int], channels: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(
            Conv2dNormActivation(c, channels, 1, norm_layer=_norm, activation_layer=nn.Hardswish) for c in in_channels
        )
        n = len(in_channels)
        self.top_down = nn.ModuleList(_sep(channels, channels) for _ in range(n - 1))
        self.down = nn.ModuleList(_sep(channels, channels, stride=2) for _ in range(n - 1))
        self.bottom_up = nn.ModuleList(_sep(channels, channels) for _ in range(n - 1))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        lat = [conv(f) for conv, f in zip(self.lateral, feats, strict=True)]
        # top-down: coarse semantics into the fine maps; sizes from the map (ceil(size / stride) need not halve)
        td = [lat[-1]]
        for i in range(len(lat) - 2, -1, -1):
            up = F.interpolate(td[0], size=lat[i].shape[-2:], mode="nearest")
            td.insert(0, self.top_down[i](lat[i] + up))
        # bottom-up: the fine maps' localisation back into the coarse ones
        out = [td[0]]
        for i in range(1, len(td)):
            out.append(self.bottom_up[i - 1](td[i] + self.down[i - 1](out[-1])))
        return out


class AnchorFreeNet(nn.Module):
    """Backbone taps + PAN + decoupled heads -> (cls (N, P, K), reg (N, P, 4, reg_max + 1), map sizes)."""

    def __init__(self, backbone: nn.Module, num_classes: int, channels: int = NECK_CHANNELS,
                 reg_max: int = REG_MAX, head_depth: int = HEAD_DEPTH) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.strides = tuple(backbone.strides)
        self.neck = PAN(backbone.out_channels, channels)
        levels = len(self.strides)
        # decoupled (YOLOX / TOOD): classification and localisation want different features
        def branch() -> nn.Sequential:
            return nn.Sequential(*(_sep(channels, channels) for _ in range(head_depth)))

        self.cls_convs = nn.ModuleList(branch() for _ in range(levels))
        self.reg_convs = nn.ModuleList(branch() for _ in range(levels))
        self.cls_out = nn.ModuleList(nn.Conv2d(channels, num_classes, 1) for _ in range(levels))
        self.reg_out = nn.ModuleList(nn.Conv2d(channels, 4 * (reg_max + 1), 1) for _ in range(levels))
        set_bn_momentum(self)

    def classification_convs(self) -> list[nn.Conv2d]:
        return list(self.cls_out)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        feats = self.neck(self.backbone(x))
        n = x.shape[0]
        cls, reg, sizes = [], [], []
        for i, f in enumerate(feats):
            c = self.cls_out[i](self.cls_convs[i](f))
            r = self.reg_out[i](self.reg_convs[i](f))
            cls.append(c.permute(0, 2, 3, 1).reshape(n, -1, self.num_classes))
            reg.append(r.permute(0, 2, 3, 1).reshape(n, -1, 4, self.reg_max + 1))
            sizes.append((f.shape[-2], f.shape[-1]))
        return torch.cat(cls, dim=1), torch.cat(reg, dim=1), sizes


class AnchorFreePostProcess(nn.Module):
    """Sigmoid, the pre-NMS top-k over (point, class) pairs, decode of those only, ``conf_thres``, one
    ``batched_nms`` over (image, class), ``max_det``; the same stable tie order as models/native.py PostProcess."""

    def __init__(self, conf_thres: float, iou_thres: float, max_det: int, pre_nms_topk: int = 5000) -> None:
        super().__init__()
        self.conf_thres = conf_thres
        self.iou_thres = iou_thres
        self.max_det = max_det
        self.pre_nms_topk = pre_nms_topk

    @torch.no_grad()
    def forward(self, cls: torch.Tensor, reg: torch.Tensor, points: torch.Tensor, strides: torch.Tensor,
                image_size: tuple[int, int]) -> list[dict[str, torch.Tensor]]:
        n, p, k = cls.shape
        h, w = image_size
        scores = cls.float().sigmoid().reshape(n, p * k)
        top_s, top_i = scores.topk(min(self.pre_nms_topk, p * k), dim=1)
        # equal scores in index order, as ONNX TopK / NonMaxSuppression order them (see PostProcess)
        top_i, pos = top_i.sort(dim=1)
        top_s, pos = top_s.gather(1, pos).sort(dim=1, descending=True, stable=True)
        top_i = top_i.gather(1, pos)
        point_i = top_i // k
        labels = top_i % k + 1
        sel = torch.gather(reg.float(), 1, point_i[..., None, None].expand(-1, -1, *reg.shape[2:]))
        boxes = decode_distances(distribution_to_distances(sel) * strides[point_i, None], points[point_i])
        scale = boxes.new_tensor([w, h, w, h])
        boxes = torch.minimum(boxes.clamp(min=0), scale)
        img = torch.arange(n, device=cls.device).unsqueeze(1).expand_as(labels)
        keep = top_s > self.conf_thres
        boxes, top_s, labels, img = boxes[keep], top_s[keep], labels[keep], img[keep]
        order = batched_nms(boxes, top_s, img * (k + 1) + labels, self.iou_thres).sort().values
        out = []
        for i in range(n):
            idx = order[img[order] == i][: self.max_det]
            out.append({"boxes": boxes[idx], "scores": top_s[idx], "labels": labels[idx]})
        return out


class AnchorFreeDetector(nn.Module):
    """A native anchor-free model under torchvision's detection contract (see ``accel_det.models.base``)."""

    def __init__(self, net: AnchorFreeNet, criterion: TaskAlignedLoss, postprocess: AnchorFreePostProcess,
                 channels: int = 3) -> None:
        super().__init__()
        self.net = net
        self.criterion = criterion
        self.postprocess = postprocess
        self.channels = channels
        register_normalisation(self, channels)

    def forward(
        self, images: torch.Tensor | Sequence[torch.Tensor], targets: list[dict[str, Any]] | None = None
    ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        if self.training and targets is None:
            raise ValueError("in train mode the model needs targets (call model.eval() for detections)")
        x = stack_images(images, self.channels)
        h, w = x.shape[-2:]
        cls, reg, sizes = self.net((x - self.mean) / self.std)
        points, strides = anchor_points(sizes, self.net.strides, device=x.device)
        if not self.training:
            return self.postprocess(cls, reg, points, strides, (h, w))
        assert targets is not None
        plain = [
            {
                "boxes": torch.as_tensor(t["boxes"]).as_subclass(torch.Tensor).to(x.device).float(),
                "labels": torch.as_tensor(t["labels"]).as_subclass(torch.Tensor).to(x.device),
            }
            for t in targets
        ]
        return self.criterion(cls, reg, points, strides, plain)


@torch.no_grad()
def init_sigmoid_bias(conv: nn.Conv2d, prior: float = 0.01) -> None:
    """Every class starts at probability ``prior`` (RetinaNet §4.1): b = -log((1 - p) / p). Thousands of
    background points per object would otherwise dominate the first steps' loss."""
    assert conv.bias is not None
    conv.bias.fill_(-math.log((1 - prior) / prior))


@MODELS.register("afdet_mobilenet_v3")
def build_afdet_mobilenet_v3(recipe: Recipe) -> AnchorFreeDetector:
    """GFL/TOOD-style anchor-free heads on a PAN over MobileNetV3-Large's strides 8/16/32."""
    m = recipe.model
    if m.backbone:  # validation refuses it too; a recipe.json edited by hand gets here
        raise RecipeError(f"model.backbone: {m.name} has only its own MobileNetV3 backbone (got {m.backbone!r})")
    net = AnchorFreeNet(MobileNetV3Taps("large", channels=m.channels), recipe.num_classes, NECK_CHANNELS, REG_MAX,
                        HEAD_DEPTH)
    set_recompute(net, m.recompute, m.name)
    init_weights(net, m.init)
    for conv in net.classification_convs():
        init_sigmoid_bias(conv)
    # model.cls_loss picks qfl or vfl; its default "ce" (MultiBox's softmax) has no sigmoid counterpart here
    cls_loss = m.cls_loss if m.cls_loss in CLS_LOSSES else DEFAULT_CLS_LOSS
    criterion = TaskAlignedLoss(reg_max=net.reg_max, cls_loss=cls_loss, loss_fp32=recipe.train.loss_fp32)
    post = AnchorFreePostProcess(recipe.eval.conf_thres, recipe.eval.iou_thres, recipe.eval.max_det)
    return AnchorFreeDetector(net, criterion, post, channels=m.channels)
