"""The exportable graph of a native anchor model (models/native.py ``AnchorDetector``).

It is the eager model's eval path written without Python-side control flow: normalise, ``net``, the class
scores (softmax, or sigmoids for model.cls_loss qfl/vfl), the
pre-NMS top-k over every (prior, class) pair of an image, decode of those candidates only, then
:func:`accel_det.deploy.nms.select_detections`. Each step mirrors ``PostProcess.forward`` op for op, so the
exported detections equal the eager ones (the export command checks it on every export).

Priors: at a fixed input size they are the eager model's own tensor, stored as a constant. With a dynamic size
they are computed in the graph from H and W, in float64 like ``PriorBox._build`` and then rounded to float32,
which reproduces the eager priors bit for bit. That relies on the nets' feature maps being ``ceil(size /
stride)`` at every size (true of FaceBoxes, MobileNetV3 and ResNet-18: every stride-2 layer pads k // 2).
"""

from __future__ import annotations

import torch
from torch import nn

from accel_det.deploy.nms import select_detections
from accel_det.models.native import AnchorDetector, class_scores
from accel_det.ops.boxes import decode


class GraphPriors(nn.Module):
    """``PriorBox`` for a symbolic H, W: the per-cell templates are constants, the grids are computed."""

    def __init__(self, priors: nn.Module) -> None:
        super().__init__()
        self.steps = list(priors.steps)
        self.clip = bool(priors.clip)
        for k in range(len(self.steps)):
            # (A, 4): cx, cy offsets in cells, w, h in pixels (PriorBox's own template, float64)
            self.register_buffer(f"template{k}", priors.cell_template(k).clone(), persistent=False)

    def forward(self, height: int, width: int) -> torch.Tensor:
        out = []
        for k, step in enumerate(self.steps):
            tpl = getattr(self, f"template{k}")
            fh, fw = (height + step - 1) // step, (width + step - 1) // step  # ceil, as PriorBox.feature_size
            ii, jj = torch.meshgrid(
                torch.arange(fh, dtype=torch.float64), torch.arange(fw, dtype=torch.float64), indexing="ij"
            )
            # the same float64 expressions as PriorBox._build, so the float32 result is identical
            cx = (jj.reshape(-1, 1) + tpl[:, 0]) * step / width
            cy = (ii.reshape(-1, 1) + tpl[:, 1]) * step / height
            w = (tpl[:, 2] / width).expand_as(cx)
            h = (tpl[:, 3] / height).expand_as(cy)
            out.append(torch.stack([cx, cy, w, h], dim=-1).reshape(-1, 4))
        priors = torch.cat(out)
        if self.clip:
            x1y1 = (priors[:, :2] - priors[:, 2:] / 2).clamp(0, 1)
            x2y2 = (priors[:, :2] + priors[:, 2:] / 2).clamp(0, 1)
            priors = torch.cat([(x1y1 + x2y2) / 2, x2y2 - x1y1], dim=1)
        return priors.float()


class NativeGraph(nn.Module):
    """images (N, C, H, W) in [0, 1] -> (boxes, scores, labels, num_dets) for an :class:`AnchorDetector`."""

    def __init__(self, model: AnchorDetector, num_classes: int, img_hw: tuple[int, int], dynamic_size: bool) -> None:
        super().__init__()
        post = model.postprocess
        self.net = model.net
        self.register_buffer("mean", model.mean.clone(), persistent=False)
        self.register_buffer("std", model.std.clone(), persistent=False)
        self.num_classes = num_classes
        self.variance = post.coder.variance
        self.sigmoid = bool(getattr(post, "sigmoid", False))
        self.conf_thres, self.iou_thres = float(post.conf_thres), float(post.iou_thres)
        self.max_det, self.pre_nms_topk = int(post.max_det), int(post.pre_nms_topk)
        self.graph_priors = GraphPriors(model.priors) if dynamic_size else None
        if not dynamic_size:
            h, w = img_hw
            self.register_buffer("priors", model.priors(h, w).float().clone(), persistent=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        h, w = images.shape[-2:]
        loc, conf = self.net((images - self.mean) / self.std)
        priors = self.priors if self.graph_priors is None else self.graph_priors(h, w)
        n, p, k1 = conf.shape
        k = k1 - 1
        scores = class_scores(conf, self.sigmoid).reshape(n, p * k)
        # over all (prior, class) pairs of each image, as PostProcess; TopK is row-wise: per image
        top_s, top_i = scores.topk(torch.sym_min(self.pre_nms_topk, p * k), dim=1)
        prior_i = torch.div(top_i, k, rounding_mode="floor")
        labels = top_i % k + 1
        sel_loc = torch.gather(loc.float(), 1, prior_i.unsqueeze(-1).expand(-1, -1, 4))
        boxes = decode(sel_loc, priors[prior_i], self.variance)
        scale = torch.stack([_as_float(w), _as_float(h), _as_float(w), _as_float(h)]).to(boxes.device)
        boxes = torch.minimum((boxes * scale).clamp(min=0), scale)
        return select_detections(boxes, top_s, labels, self.num_classes, self.conf_thres, self.iou_thres,
                                 self.max_det)


def _as_float(size: int | torch.SymInt) -> torch.Tensor:
    # a static size becomes a constant; a symbolic one a Shape -> Cast in the graph
    return torch.scalar_tensor(size, dtype=torch.float32)
