"""Box conversions and SSD box coding, shared by ``accel_det.models`` and ``accel_det.losses``.

Neutral ground (as DETR's ``util/box_ops.py``): it imports only torch, so the criterion can use the
coder without importing the models package, and the models can import the criterion at module level.

SSD box coding (Liu et al. 2016, eq. 2): offsets of a box from its prior, scaled by ``variance``.

``encode``: centre offsets in units of the prior size divided by ``variance[0]``, log size ratios
divided by ``variance[1]``. The variances (0.1, 0.2) only rescale the targets to roughly unit variance
so the regression loss is balanced against the classification loss. Everything broadcasts, so the
same functions serve (P, 4) and (N, P, 4).
"""

from __future__ import annotations

import torch


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) centre x, centre y, width, height -> x1, y1, x2, y2."""
    half = boxes[..., 2:] / 2
    return torch.cat([boxes[..., :2] - half, boxes[..., :2] + half], dim=-1)


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) x1, y1, x2, y2 -> centre x, centre y, width, height."""
    return torch.cat([(boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2]], dim=-1)


def encode(boxes: torch.Tensor, priors: torch.Tensor, variance: tuple[float, float]) -> torch.Tensor:
    """xyxy ``boxes`` matched to ``priors`` (cx, cy, w, h) -> regression targets (..., 4).

    Boxes must have positive width and height (log of the size ratio); the criterion drops
    degenerate ground truth before matching for that reason.
    """
    b = xyxy_to_cxcywh(boxes)
    g_cxcy = (b[..., :2] - priors[..., :2]) / (variance[0] * priors[..., 2:])
    g_wh = torch.log(b[..., 2:] / priors[..., 2:]) / variance[1]
    return torch.cat([g_cxcy, g_wh], dim=-1)


def decode(loc: torch.Tensor, priors: torch.Tensor, variance: tuple[float, float]) -> torch.Tensor:
    """Inverse of :func:`encode`: predictions (..., 4) -> xyxy boxes in the priors' units."""
    cxcy = priors[..., :2] + loc[..., :2] * variance[0] * priors[..., 2:]
    # exp of an untrained/diverging regressor can overflow to inf in fp16; clamp as torchvision does
    # (log(1000/16)) so a bad prediction becomes a large box instead of a NaN after NMS.
    wh = priors[..., 2:] * torch.exp((loc[..., 2:] * variance[1]).clamp(max=4.135))
    return torch.cat([cxcy - wh / 2, cxcy + wh / 2], dim=-1)


class BoxCoder:
    """``encode``/``decode`` bound to one ``variance`` (what the criterion and postprocess share)."""

    def __init__(self, variance: tuple[float, float] = (0.1, 0.2)) -> None:
        self.variance = (float(variance[0]), float(variance[1]))

    def encode(self, boxes: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
        return encode(boxes, priors, self.variance)

    def decode(self, loc: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
        return decode(loc, priors, self.variance)


def paired_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """IoU of ``a[i]`` with ``b[i]`` (both (..., 4) xyxy): the diagonal of ``box_iou`` without its (M, M) matrix."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(dim=-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(dim=-1)
    return inter / (area_a + area_b - inter + eps)
