"""The native anchor detector: ``net`` + ``priors`` + ``criterion`` + ``postprocess`` (DETR-style split).

``net`` maps normalised images (N, C, H, W) to raw ``loc`` (N, P, 4) and ``conf`` (N, P, K+1) logits
(class 0 = background) and exposes ``strides`` (one per feature map) and ``classification_convs()``
(the last conv of each conf head, for the bias prior). Everything here follows the model contract in
docs/architecture.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms

from accel_det.config import AnchorConfig, Recipe
from accel_det.errors import RecipeError
from accel_det.losses.multibox import MultiBoxLoss
from accel_det.models.init import init_conf_bias, init_weights
from accel_det.models.priors import PriorBox
from accel_det.models.recompute import set_recompute
from accel_det.ops.boxes import BoxCoder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PostProcess(nn.Module):
    """Decode, softmax, ``conf_thres``, per-class NMS, ``max_det`` -> torchvision-style detections."""

    def __init__(
        self,
        variance: tuple[float, float],
        conf_thres: float,
        iou_thres: float,
        max_det: int,
        pre_nms_topk: int = 5000,
        sigmoid: bool = False,
    ) -> None:
        super().__init__()
        self.coder = BoxCoder(variance)
        # how the conf logits become class scores: softmax over background + K, or K independent sigmoids
        # (model.cls_loss qfl/vfl train those towards the box's IoU); the background channel is unused then
        self.sigmoid = sigmoid
        self.conf_thres = conf_thres
        self.iou_thres = iou_thres
        self.max_det = max_det
        # FaceBoxes.PyTorch's test keeps the top 5000 before NMS: with conf_thres = 0.001 (COCO-style
        # eval) nearly every (prior, class) pair passes, and NMS over 20k+ boxes dominates the runtime.
        self.pre_nms_topk = pre_nms_topk

    @torch.no_grad()
    def forward(
        self, loc: torch.Tensor, conf: torch.Tensor, priors: torch.Tensor, image_size: tuple[int, int]
    ) -> list[dict[str, torch.Tensor]]:
        n, p, k1 = conf.shape
        k = k1 - 1
        h, w = image_size
        scores = class_scores(conf, self.sigmoid).reshape(n, p * k)
        top_s, top_i = scores.topk(min(self.pre_nms_topk, p * k), dim=1)  # (N, T)
        # Equal scores (saturated at 1.0 in a confident model) in a fixed order, the lower index first, as
        # ONNX's TopK and NonMaxSuppression order them: the exported graph (accel_det/deploy) then keeps the
        # same boxes. Two sorts of T candidates, not of all P * K scores.
        top_i, pos = top_i.sort(dim=1)
        top_s, pos = top_s.gather(1, pos).sort(dim=1, descending=True, stable=True)
        top_i = top_i.gather(1, pos)
        prior_i = top_i // k
        labels = top_i % k + 1
        # decode only the candidates, not all P priors
        sel_loc = torch.gather(loc.float(), 1, prior_i.unsqueeze(-1).expand(-1, -1, 4))
        boxes = self.coder.decode(sel_loc, priors.float()[prior_i])
        scale = boxes.new_tensor([w, h, w, h])
        boxes = torch.minimum((boxes * scale).clamp(min=0), scale)  # pixels, inside the image
        img = torch.arange(n, device=conf.device).unsqueeze(1).expand_as(labels)
        keep = top_s > self.conf_thres
        boxes, top_s, labels, img = boxes[keep], top_s[keep], labels[keep], img[keep]
        # one NMS call for the whole batch: groups = (image, class)
        # the kept candidates in their (score, index) order: torchvision's own result order is unstable on ties
        order = batched_nms(boxes, top_s, img * k1 + labels, self.iou_thres).sort().values
        out = []
        for i in range(n):
            idx = order[img[order] == i][: self.max_det]
            out.append({"boxes": boxes[idx], "scores": top_s[idx], "labels": labels[idx]})
        return out


def register_normalisation(
    module: nn.Module, channels: int, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> None:
    """``module.mean`` / ``module.std`` (1, C, 1, 1): ImageNet's for RGB, 0.5 otherwise, unless given."""
    if mean is None or std is None:
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,) * channels, (0.5,) * channels)
    # non-persistent: checkpoints hold only learned weights, and old ones keep loading
    module.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
    module.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)


def stack_images(images: torch.Tensor | Sequence[torch.Tensor], channels: int) -> torch.Tensor:
    """A native model's input: a (N, C, H, W) batch or a list of same-size (C, H, W) images; uint8 -> [0, 1]."""
    if not isinstance(images, torch.Tensor):
        sizes = {tuple(im.shape) for im in images}
        if len(sizes) != 1:
            raise ValueError(f"native models need same-size images (resize to img_dim first), got {sizes}")
        images = torch.stack(list(images))
    if images.dim() != 4 or images.shape[1] != channels:
        raise ValueError(f"expected images (N, {channels}, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():  # uint8 straight from a decoder
        images = images.float() / 255
    return images


def class_scores(conf: torch.Tensor, sigmoid: bool) -> torch.Tensor:
    """(N, P, K+1) conf logits -> (N, P, K) object-class scores (the eager and the exported graphs share it)."""
    if sigmoid:
        return conf[..., 1:].float().sigmoid()
    return F.softmax(conf.float(), dim=-1)[..., 1:]  # drop background


class AnchorDetector(nn.Module):
    """A native anchor model under torchvision's detection contract (see ``accel_det.models.base``)."""

    def __init__(
        self,
        net: nn.Module,
        priors: PriorBox,
        criterion: MultiBoxLoss,
        postprocess: PostProcess,
        channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.priors = priors
        self.criterion = criterion
        self.postprocess = postprocess
        self.channels = channels
        register_normalisation(self, channels, mean, std)

    def forward(
        self, images: torch.Tensor | Sequence[torch.Tensor], targets: list[dict[str, Any]] | None = None
    ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        if self.training and targets is None:
            raise ValueError("in train mode the model needs targets (call model.eval() for detections)")
        x = stack_images(images, self.channels)
        h, w = x.shape[-2:]
        loc, conf = self.net((x - self.mean) / self.std)
        priors = self.priors(h, w, device=x.device)
        if loc.shape[1] != priors.shape[0]:
            raise RuntimeError(
                f"net predicts {loc.shape[1]} boxes at {h}x{w} but the anchors give {priors.shape[0]} "
                "priors: do model.anchors' steps match the net's feature strides?"
            )
        if not self.training:
            return self.postprocess(loc, conf, priors, (h, w))
        assert targets is not None
        scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=x.device)
        norm = [
            {
                # tv_tensors.BoundingBoxes -> plain tensor; pixels -> [0, 1] like the priors
                "boxes": torch.as_tensor(t["boxes"]).as_subclass(torch.Tensor).to(x.device).float() / scale,
                "labels": torch.as_tensor(t["labels"]).as_subclass(torch.Tensor).to(x.device),
            }
            for t in targets
        ]
        return self.criterion(loc, conf, priors, norm)


def flatten_heads(maps: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    """Head maps (N, A*width, H, W) per level -> (N, sum H*W*A, width) in the priors' order."""
    n = maps[0].shape[0]
    return torch.cat([m.permute(0, 2, 3, 1).reshape(n, -1, width) for m in maps], dim=1)


def build_anchor_detector(
    recipe: Recipe,
    make_net: Callable[[list[int]], nn.Module],
    anchors: AnchorConfig,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> AnchorDetector:
    """Assemble a native detector from the recipe; ``make_net(anchors per cell per level)``."""
    m = recipe.model
    priors = PriorBox(anchors)
    net = make_net(priors.num_anchors())
    label = f"{m.name} on {m.backbone}" if m.backbone else m.name
    if list(net.strides) != list(anchors.steps):
        # validation knows the strides of native nets and of the catalog's timm names; other timm nets get here
        raise RecipeError(
            f"model.anchors.steps: {list(anchors.steps)} but {label} has feature strides {list(net.strides)}: "
            "set [model.anchors] steps (and min_sizes, aspect_ratios) for these"
        )
    set_recompute(net, m.recompute, label)
    init_weights(net, m.init)
    for conv in net.classification_convs():
        init_conf_bias(conv, recipe.num_classes, sigmoid=m.cls_loss != "ce")
    criterion = MultiBoxLoss(
        variance=anchors.variance,
        match_iou=m.match_iou,
        neg_pos_ratio=m.neg_pos_ratio,
        loc_loss=m.loc_loss,
        cls_loss=m.cls_loss,
        loc_weight=m.loc_weight,
        loss_fp32=recipe.train.loss_fp32,
    )
    post = PostProcess(
        anchors.variance, recipe.eval.conf_thres, recipe.eval.iou_thres, recipe.eval.max_det,
        sigmoid=m.cls_loss != "ce",
    )
    # a timm backbone's weights expect its pretrained config's normalisation (models/timm_backbone.py)
    norm = getattr(getattr(net, "backbone", None), "norm", None)
    if mean is None and norm is not None:
        mean, std = norm
    return AnchorDetector(net, priors, criterion, post, channels=m.channels, mean=mean, std=std)
