"""The anchor-free criterion: task-aligned assignment (TOOD, Feng et al. 2021 §3.2), an IoU-aware classification
loss (VarifocalNet / GFL's quality focal loss, losses/quality.py), CIoU (Zheng et al. 2020) and the distribution
focal loss (GFL, Li et al. 2020 §3.3) on the general-distribution box head of models/anchor_free.py.

Also the point / distance helpers the model, this loss and the exported graph (deploy/anchor_free.py) share, here
rather than in ``models`` so that ``losses`` never imports ``models``.

Units: points, boxes and strides in input pixels; the distribution's bins in stride units (bin i = i strides).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from torchvision.ops import complete_box_iou_loss

from accel_det.losses.quality import quality_focal_loss, varifocal_loss

CLS_LOSSES = {"vfl": varifocal_loss, "qfl": quality_focal_loss}


def anchor_points(
    sizes: Sequence[tuple[int, int]], strides: Sequence[int], device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The centres ``((j + 0.5) * stride, (i + 0.5) * stride)`` of every cell of every map, row-major per level
    as the heads flatten them: points (P, 2) x, y pixels and each point's stride (P,)."""
    points, per_point = [], []
    for (h, w), s in zip(sizes, strides, strict=True):
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * s
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * s
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        level = torch.stack([xx, yy], dim=-1).reshape(-1, 2)
        points.append(level)
        per_point.append(level.new_full((level.shape[0],), float(s)))
    return torch.cat(points), torch.cat(per_point)


def distribution_to_distances(logits: torch.Tensor) -> torch.Tensor:
    """(..., 4, reg_max + 1) logits -> (..., 4) distances in stride units: the expectation of each softmax."""
    bins = torch.arange(logits.shape[-1], device=logits.device, dtype=logits.dtype)
    return (logits.softmax(dim=-1) * bins).sum(dim=-1)


def decode_distances(dist: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Distances (..., 4) l, t, r, b in pixels from points (..., 2) -> boxes (..., 4) xyxy."""
    return torch.cat([points - dist[..., :2], points + dist[..., 2:]], dim=-1)


def distribution_focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """GFL eq. 6: cross-entropy to the two bins around a continuous ``target`` (in bins, < the last bin), each
    weighted by the target's closeness to the other, so the expectation's optimum is the target itself.
    ``logits`` (..., R + 1), ``target`` (...) -> (...)."""
    left = target.floor().long()
    w_left = (left + 1).to(target.dtype) - target
    logp = F.log_softmax(logits, dim=-1)
    lp = logp.gather(-1, left.unsqueeze(-1)).squeeze(-1)
    rp = logp.gather(-1, (left + 1).unsqueeze(-1)).squeeze(-1)
    return -(lp * w_left + rp * (1 - w_left))


def batched_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """IoU of every box of ``a`` (N, M, 4) with every box of ``b`` (N, P, 4), image by image -> (N, M, P)."""
    lt = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    return inter / (area_a[..., :, None] + area_b[..., None, :] - inter).clamp(min=eps)


@torch.no_grad()
def task_aligned_assign(
    scores: torch.Tensor,
    pred_boxes: torch.Tensor,
    points: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    gt_mask: torch.Tensor,
    topk: int = 10,
    alpha: float = 1.0,
    beta: float = 6.0,
    eps: float = 1e-9,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TOOD's task-aligned assignment, for the whole batch at once (ground truth padded to M boxes per image).

    ``scores`` (N, P, K) sigmoid probabilities, ``pred_boxes`` (N, P, 4) and ``gt_boxes`` (N, M, 4) xyxy pixels,
    ``points`` (P, 2), ``gt_labels`` (N, M) in 1..K, ``gt_mask`` (N, M) real (non-padding, non-degenerate) boxes.
    Alignment t = s^alpha * u^beta (s: the score of the box's class, u: the IoU of the prediction with the box);
    candidates are the points inside the box, the top-k of them by t are its positives, and a point claimed
    by several boxes keeps the one its prediction overlaps most. Returns ``fg`` (N, P) bool, ``gt_index`` (N, P)
    (the point's box; 0 for background) and ``t_hat`` (N, P): t / max t of its box * max IoU of its box,
    the soft target (0 for background).
    """
    n, p, _ = scores.shape
    m = gt_boxes.shape[1]
    iou = batched_iou(gt_boxes, pred_boxes)  # (N, M, P)
    cls = (gt_labels - 1).clamp(min=0)
    s = scores.gather(2, cls.unsqueeze(1).expand(n, p, m)).transpose(1, 2)  # (N, M, P)
    deltas = torch.cat([points - gt_boxes[..., None, :2], gt_boxes[..., None, 2:] - points], dim=-1)
    cand = (deltas.amin(dim=-1) > eps) & gt_mask.unsqueeze(-1)  # (N, M, P): the point lies inside the box
    align = s.pow(alpha) * iou.pow(beta) * cand
    # candidates first even where the alignment is still 0 (a fresh head), so a box keeps up to k positives
    ranked = torch.where(cand, align, -1.0)
    top = ranked.topk(min(topk, p), dim=-1).indices
    pos = torch.zeros_like(cand).scatter_(-1, top, True) & cand
    # a point claimed by several boxes: the one its prediction overlaps most
    best = iou.masked_fill(~pos, -1.0).argmax(dim=1)  # (N, P)
    pos = pos & (torch.arange(m, device=pos.device).view(1, m, 1) == best.unsqueeze(1))
    fg = pos.any(dim=1)
    align = align * pos
    max_align = align.amax(dim=-1, keepdim=True)
    max_iou = (iou * pos).amax(dim=-1, keepdim=True)
    t_hat = (align * max_iou / (max_align + eps)).amax(dim=1)  # one box per point: the max picks it
    return fg, best.masked_fill(~fg, 0), t_hat


class TaskAlignedLoss(nn.Module):
    """Returns ``{"loss_cls", "loss_box", "loss_dfl"}``, each a sum over the batch divided by the sum of the soft
    targets t_hat (clamped >= 1): TOOD's normaliser, so well-aligned positives weigh more than barely-assigned
    ones and the loss does not grow with the batch's object count.

    Weights 1 / 2 / 0.25 are GFL's (QFL 1, GIoU 2, DFL 0.25, DFL averaged over the 4 sides), kept because the
    terms are normalised the same way here: the box term's CIoU is in [0, ~2], twice the weight puts localisation
    on a par with the classification sum, and DFL only shapes the distributions around the CIoU's boxes.
    """

    def __init__(
        self,
        reg_max: int = 16,
        topk: int = 10,
        alpha: float = 1.0,
        beta: float = 6.0,
        cls_loss: str = "vfl",
        weights: tuple[float, float, float] = (1.0, 2.0, 0.25),
        loss_fp32: bool = True,
    ) -> None:
        super().__init__()
        if cls_loss not in CLS_LOSSES:
            raise ValueError(f"cls_loss must be one of {', '.join(CLS_LOSSES)}, got {cls_loss!r}")
        self.reg_max = reg_max
        self.topk, self.alpha, self.beta = topk, alpha, beta
        self.cls_loss = cls_loss
        self.weights = weights
        self.loss_fp32 = loss_fp32

    def forward(
        self,
        cls: torch.Tensor,
        reg: torch.Tensor,
        points: torch.Tensor,
        strides: torch.Tensor,
        targets: list[dict[str, torch.Tensor]],
    ) -> dict[str, torch.Tensor]:
        if self.loss_fp32:
            # sums over thousands of points x classes lose precision in fp16: the whole loss in fp32
            with torch.autocast(device_type=cls.device.type, enabled=False):
                return self._loss(cls.float(), reg.float(), points.float(), strides.float(), targets)
        return self._loss(cls, reg, points, strides, targets)

    def _loss(
        self,
        cls: torch.Tensor,
        reg: torch.Tensor,
        points: torch.Tensor,
        strides: torch.Tensor,
        targets: list[dict[str, torch.Tensor]],
    ) -> dict[str, torch.Tensor]:
        n, _, k = cls.shape
        dev, dt = cls.device, cls.dtype
        # at least one slot, so a batch without any box runs the same code (every slot masked)
        empty = [{"boxes": torch.zeros(1, 4, device=dev, dtype=dt), "labels": torch.zeros(1, dtype=torch.int64,
                                                                                          device=dev)}]
        boxes = pad_sequence([t["boxes"].to(dev, dt).reshape(-1, 4) for t in [*targets, *empty]], batch_first=True)
        labels = pad_sequence([t["labels"].to(dev, torch.int64).reshape(-1) for t in [*targets, *empty]],
                              batch_first=True)
        boxes, labels = boxes[:n], labels[:n]
        # degenerate boxes (zero width or height after a crop) and the zero padding have no inside to assign
        mask = (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])

        dist = distribution_to_distances(reg)  # (N, P, 4) strides
        pred = decode_distances(dist * strides[:, None], points)
        fg, idx, t_hat = task_aligned_assign(cls.detach().sigmoid(), pred.detach(), points, boxes, labels, mask,
                                             self.topk, self.alpha, self.beta)
        norm = t_hat.sum().clamp(min=1.0)
        tgt_labels = labels.gather(1, idx)
        score = F.one_hot((tgt_labels - 1).clamp(min=0), k).to(dt) * t_hat.unsqueeze(-1)
        loss_cls = CLS_LOSSES[self.cls_loss](cls, score).sum() / norm

        weight = t_hat[fg]
        tgt_boxes = boxes.gather(1, idx.unsqueeze(-1).expand(-1, -1, 4))[fg]
        loss_box = (complete_box_iou_loss(pred[fg], tgt_boxes, reduction="none") * weight).sum() / norm
        pts, st = points.expand(n, -1, -1)[fg], strides.expand(n, -1)[fg]
        tgt_dist = torch.cat([pts - tgt_boxes[:, :2], tgt_boxes[:, 2:] - pts], dim=-1) / st[:, None]
        tgt_dist = tgt_dist.clamp(0, self.reg_max - 0.01)
        loss_dfl = (distribution_focal_loss(reg[fg], tgt_dist).mean(-1) * weight).sum() / norm
        w_cls, w_box, w_dfl = self.weights
        return {"loss_cls": loss_cls * w_cls, "loss_box": loss_box * w_box, "loss_dfl": loss_dfl * w_dfl}
