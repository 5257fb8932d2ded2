"""The exportable graph of the anchor-free model (models/anchor_free.py ``AnchorFreeDetector``).

The eager eval path without Python-side control flow: normalise, ``net``, sigmoid, the pre-NMS top-k over every
(point, class) pair of an image, the expectation of the selected points' distributions only, then
:func:`accel_det.deploy.nms.select_detections`. Each step mirrors ``AnchorFreePostProcess.forward``, so the
exported detections equal the eager ones (the export command checks it on every export).

The points come from the feature maps' sizes, symbolic with a dynamic H, W, through the same
:func:`anchor_points` as the eager model: small integers times a power-of-two stride, exact in float32 both ways.
"""

from __future__ import annotations

import torch
from torch import nn

from accel_det.deploy.native import _as_float
from accel_det.deploy.nms import select_detections
from accel_det.losses.anchor_free import anchor_points, decode_distances, distribution_to_distances
from accel_det.models.anchor_free import AnchorFreeDetector


class AnchorFreeGraph(nn.Module):
    """images (N, C, H, W) in [0, 1] -> (boxes, scores, labels, num_dets) for an :class:`AnchorFreeDetector`."""

    def __init__(self, model: AnchorFreeDetector, num_classes: int) -> None:
        super().__init__()
        post = model.postprocess
        self.net = model.net
        self.strides = tuple(model.net.strides)
        self.register_buffer("mean", model.mean.clone(), persistent=False)
        self.register_buffer("std", model.std.clone(), persistent=False)
        self.num_classes = num_classes
        self.conf_thres, self.iou_thres = float(post.conf_thres), float(post.iou_thres)
        self.max_det, self.pre_nms_topk = int(post.max_det), int(post.pre_nms_topk)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        h, w = images.shape[-2:]
        cls, reg, sizes = self.net((images - self.mean) / self.std)
        points, strides = anchor_points(sizes, self.strides, device=images.device)
        n, p, k = cls.shape
        scores = cls.float().sigmoid().reshape(n, p * k)
        top_s, top_i = scores.topk(torch.sym_min(self.pre_nms_topk, p * k), dim=1)
        point_i = torch.div(top_i, k, rounding_mode="floor")
        labels = top_i % k + 1
        sel = torch.gather(reg.float(), 1, point_i[..., None, None].expand(-1, -1, 4, reg.shape[-1]))
        boxes = decode_distances(distribution_to_distances(sel) * strides[point_i, None], points[point_i])
        scale = torch.stack([_as_float(w), _as_float(h), _as_float(w), _as_float(h)]).to(boxes.device)
        boxes = torch.minimum(boxes.clamp(min=0), scale)
        return select_detections(boxes, top_s, labels, self.num_classes, self.conf_thres, self.iou_thres,
                                 self.max_det)
