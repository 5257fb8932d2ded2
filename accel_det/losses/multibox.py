"""MultiBox loss (SSD, Liu et al. 2016 §2.2; FaceBoxes §3.4): match, encode, loc loss + mined CE.

Inputs are the raw head outputs ``loc`` (N, P, 4) and ``conf`` (N, P, K+1) (class 0 = background),
the priors (P, 4) normalised cx, cy, w, h, and targets with boxes already normalised xyxy in [0, 1].
Both terms are summed and divided by the number of matched priors in the batch (clamped >= 1), as in
the paper: the loss per positive, whatever the batch size or image content.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou, complete_box_iou_loss, distance_box_iou_loss, generalized_box_iou_loss

from accel_det.losses.quality import quality_focal_loss, varifocal_loss
from accel_det.ops.boxes import BoxCoder, cxcywh_to_xyxy, paired_iou

# on the encoded offsets
OFFSET_LOSSES = {"smooth_l1": F.smooth_l1_loss, "l1": F.l1_loss}
# on the decoded xyxy boxes
IOU_LOSSES = {"giou": generalized_box_iou_loss, "diou": distance_box_iou_loss, "ciou": complete_box_iou_loss}
LOC_LOSSES = (*OFFSET_LOSSES, *IOU_LOSSES)
# sigmoid scores trained towards the matched box's IoU, over every prior (no mining)
QUALITY_LOSSES = {"qfl": quality_focal_loss, "vfl": varifocal_loss}
CLS_LOSSES = ("ce", *QUALITY_LOSSES)


def match(
    gt_boxes: list[torch.Tensor], gt_labels: list[torch.Tensor], priors: torch.Tensor, iou_thres: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign every prior a ground-truth box (N, P, 4 xyxy) and a label (N, P; 0 = background).

    A prior is positive when its best IoU with a box is >= ``iou_thres``; on top, the best prior of
    every box is forced positive for that box (SSD's bipartite step), so a box whose best IoU is below
    the threshold (a tiny or oddly shaped object) still gets a prior instead of being ignored.
    Vectorised over the batch: one (T, P) IoU matrix for all T boxes, reduced per image with
    ``scatter_reduce``. Padding to (N, max boxes, P) would be simpler but costs N * max / T times the
    memory: 1.4 GB for a WIDER FACE batch of 32 with one 500-face image at 21824 priors.
    """
    n, p = len(gt_boxes), priors.shape[0]
    device = priors.device
    sizes = [len(b) for b in gt_boxes]  # shapes only: no host<->device copy or sync in the step
    if sum(sizes) == 0:
        return priors.new_zeros(n, p, 4), torch.zeros(n, p, dtype=torch.int64, device=device)
    boxes = torch.cat(gt_boxes)  # (T, 4)
    all_labels = torch.cat(gt_labels).to(device=device, dtype=torch.int64)
    t = boxes.shape[0]
    img = torch.cat([torch.full((s,), i, dtype=torch.int64, device=device) for i, s in enumerate(sizes)])
    iou = box_iou(boxes, cxcywh_to_xyxy(priors))  # (T, P)
    seg = img.unsqueeze(1).expand(t, p)
    best_gt_iou = iou.new_full((n, p), -1.0).scatter_reduce(0, seg, iou, "amax")  # best box per prior
    box_idx = torch.arange(t, device=device)
    # argmax within each image's boxes: among the boxes reaching the max, take the last index
    cand = torch.where(iou == best_gt_iou[img], box_idx.unsqueeze(1), -1)
    best_gt = torch.full((n, p), -1, dtype=torch.int64, device=device).scatter_reduce(0, seg, cand, "amax")
    best_prior = iou.argmax(dim=1)  # (T,): best prior of each box
    best_gt_iou[img, best_prior] = 2.0  # force, above any threshold
    best_gt[img, best_prior] = box_idx
    best_gt = best_gt.clamp(min=0)  # images without boxes: any index, the label below is 0
    labels = all_labels[best_gt]
    labels[best_gt_iou < iou_thres] = 0
    return boxes[best_gt], labels


class MultiBoxLoss(nn.Module):
    """Returns ``{"loss_loc", "loss_cls"}``; see the module docstring for the normalisation."""

    def __init__(
        self,
        variance: tuple[float, float] = (0.1, 0.2),
        match_iou: float = 0.35,
        neg_pos_ratio: float = 3.0,
        loc_loss: str = "smooth_l1",
        loss_fp32: bool = True,
        empty_negatives: int = 16,
        loc_weight: float = 1.0,
        cls_loss: str = "ce",
    ) -> None:
        super().__init__()
        if loc_loss not in LOC_LOSSES:
            raise ValueError(f"loc_loss must be one of {', '.join(LOC_LOSSES)}, got {loc_loss!r}")
        if cls_loss not in CLS_LOSSES:
            raise ValueError(f"cls_loss must be one of {', '.join(CLS_LOSSES)}, got {cls_loss!r}")
        self.cls_loss = cls_loss
        self.coder = BoxCoder(variance)
        self.match_iou = match_iou
        self.neg_pos_ratio = neg_pos_ratio
        self.loc_loss = loc_loss
        self.loc_weight = loc_weight
        self.loss_fp32 = loss_fp32
        # SSD mines neg_pos_ratio * #pos negatives, i.e. none on an image without objects, which then
        # teaches nothing about false positives; give such images a fixed small number instead.
        self.empty_negatives = empty_negatives

    def forward(
        self,
        loc: torch.Tensor,
        conf: torch.Tensor,
        priors: torch.Tensor,
        targets: list[dict[str, torch.Tensor]],
    ) -> dict[str, torch.Tensor]:
        if self.loss_fp32:
            # fp16 CE over ~20k priors and sums over the batch overflow / lose precision: leave
            # autocast and compute the whole loss in fp32 (the seed's keep_loss_fp32).
            with torch.autocast(device_type=loc.device.type, enabled=False):
                return self._loss(loc.float(), conf.float(), priors.float(), targets)
        return self._loss(loc, conf, priors, targets)

    def _loss(
        self,
        loc: torch.Tensor,
        conf: torch.Tensor,
        priors: torch.Tensor,
        targets: list[dict[str, torch.Tensor]],
    ) -> dict[str, torch.Tensor]:
        boxes, labels = [], []
        for t in targets:
            b = t["boxes"].to(device=loc.device, dtype=priors.dtype).reshape(-1, 4)
            # Degenerate boxes (zero width/height after a crop) would encode to log(0) = -inf.
            keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
            boxes.append(b[keep])
            labels.append(t["labels"].reshape(-1)[keep.to(t["labels"].device)])
        with torch.no_grad():
            matched, conf_t = match(boxes, labels, priors, self.match_iou)
        pos = conf_t > 0  # (N, P)
        num_pos = pos.sum(dim=1)  # (N,)
        denom = num_pos.sum().clamp(min=1).to(loc.dtype)

        # Localisation: only matched priors regress (the seed uses L1, SSD/FaceBoxes smooth L1).
        pos_priors = priors.expand_as(matched)[pos]
        boxes_p = None
        if self.loc_loss in OFFSET_LOSSES:
            loc_t = self.coder.encode(matched[pos], pos_priors)
            loss_loc = OFFSET_LOSSES[self.loc_loss](loc[pos], loc_t, reduction="sum") / denom
        else:
            # An IoU loss scores the box itself rather than four offsets weighted by the variances: what the
            # stricter IoUs of AP@[.5:.95] reward (GIoU: Rezatofighi et al. 2019; DIoU/CIoU: Zheng et al. 2020).
            boxes_p = self.coder.decode(loc[pos], pos_priors)
            loss_loc = IOU_LOSSES[self.loc_loss](boxes_p, matched[pos], reduction="sum") / denom
        loss_loc = loss_loc * self.loc_weight
        if self.cls_loss != "ce":
            if boxes_p is None:
                boxes_p = self.coder.decode(loc[pos], pos_priors)
            return {"loss_loc": loss_loc, "loss_cls": self._quality_cls(conf, conf_t, pos, boxes_p, matched, denom)}

        # Classification with hard negative mining: rank the negatives of each image by their CE and
        # keep the top neg_pos_ratio * #pos, so the ~1000:1 background imbalance does not swamp the loss.
        k1 = conf.shape[-1]
        ce = F.cross_entropy(conf.reshape(-1, k1), conf_t.reshape(-1), reduction="none").view_as(conf_t)
        with torch.no_grad():
            mining = ce.detach().masked_fill(pos, -1.0)  # positives never count as negatives
            order = mining.argsort(dim=1, descending=True)
            # rank of each prior in its image, via one scatter instead of a second argsort
            rank = torch.empty_like(order).scatter_(
                1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
            )
            num_neg = torch.where(
                num_pos > 0,
                (self.neg_pos_ratio * num_pos).long(),
                torch.full_like(num_pos, self.empty_negatives),
            )
            num_neg = torch.minimum(num_neg, pos.shape[1] - num_pos)
            neg = rank < num_neg.unsqueeze(1)
        loss_cls = ce[pos | neg].sum() / denom
        return {"loss_loc": loss_loc, "loss_cls": loss_cls}

    def _quality_cls(
        self,
        conf: torch.Tensor,
        conf_t: torch.Tensor,
        pos: torch.Tensor,
        boxes_p: torch.Tensor,
        matched: torch.Tensor,
        denom: torch.Tensor,
    ) -> torch.Tensor:
        """QFL / VFL over every (prior, class): the matched class's target is the IoU of the prior's decoded
        box with its object (detached: the target is a quality to predict, not a way to move the box), every
        other entry 0. No mining: the loss's own modulating factor down-weights the easy background (GFL §3.2),
        and it is normalised by the number of positives, as the box term."""
        logits = conf[..., 1:]  # the background channel has no role with sigmoid scores
        with torch.no_grad():
            quality = paired_iou(boxes_p.detach(), matched[pos])
            target = torch.zeros_like(logits)
            pos_labels = conf_t[pos] - 1
            target[pos] = F.one_hot(pos_labels, logits.shape[-1]).to(target.dtype) * quality.unsqueeze(1)
        return QUALITY_LOSSES[self.cls_loss](logits, target).sum() / denom
