"""Exportable graphs of the torchvision one-stage detectors (models/torchvision_zoo.py): SSD, SSDlite, RetinaNet,
FCOS.

Their ``postprocess_detections`` loops over images and classes with boolean masks, which no exporter turns into
a batch-independent fixed-shape graph. So the graph keeps their modules (``backbone``, ``head``, ``box_coder``)
and rewrites only the glue, following each ``postprocess_detections`` step for step:

* the transform: normalise, resize (SSD: to its fixed 300/320; the others: identity at img_dim) and pad to
  ``size_divisible``, all sizes fixed at export — the anchors (the ``anchor_generator``'s, computed once) too;
* the candidates: SSD per class, the top ``topk_candidates`` of every class over all anchors; RetinaNet and
  FCOS per feature level, the top ``topk_candidates`` over the level's (anchor, class) pairs. torchvision
  thresholds before its top-k and we after: the same set, since every candidate above the threshold that is in
  one is in the other;
* then the shared tail (``select_detections``): threshold, per-class NMS, ``detections_per_img``, padding.

Faster R-CNN is not exported: its second stage runs on the RPN's per-image proposals, whose count depends on
the data (NMS per level, small-box removal) — a fixed-shape rewrite of the RPN is future work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.faster_rcnn import FasterRCNN
from torchvision.models.detection.fcos import FCOS
from torchvision.models.detection.retinanet import RetinaNet
from torchvision.models.detection.ssd import SSD
from torchvision.ops.boxes import clip_boxes_to_image

from accel_det.deploy import ExportError
from accel_det.deploy.nms import select_detections

NOT_EXPORTABLE = {
    FasterRCNN: "two-stage: the RoI heads run on per-image RPN proposals whose number depends on the data, "
                    "which the fixed-shape export contract cannot hold yet",
}


def _features(backbone: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    feats = backbone(x)
    return [feats] if isinstance(feats, torch.Tensor) else list(feats.values())


class ZooGraph(nn.Module):
    """images (N, 3, img_dim, img_dim) in [0, 1] -> (boxes, scores, labels, num_dets) for SSD/RetinaNet/FCOS."""

    def __init__(self, model: nn.Module, name: str, num_classes: int, img_dim: int) -> None:
        super().__init__()
        for cls, reason in NOT_EXPORTABLE.items():
            if isinstance(model, cls):
                raise ExportError(f"{name}: cannot be exported: {reason}")
        if isinstance(model, SSD):
            self.kind = "ssd"
        elif isinstance(model, FCOS):
            self.kind = "fcos"
        elif isinstance(model, RetinaNet):
            self.kind = "retinanet"
        else:
            raise ExportError(f"{name}: cannot be exported: no graph wrapper for {type(model).__name__}")
        self.backbone, self.head, self.box_coder = model.backbone, model.head, model.box_coder
        self.num_classes = num_classes
        self.conf_thres, self.iou_thres = float(model.score_thresh), float(model.nms_thresh)
        self.max_det, self.topk = int(model.detections_per_img), int(model.topk_candidates)
        t = model.transform
        self.register_buffer("mean", torch.as_tensor(t.image_mean, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.as_tensor(t.image_std, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        with torch.no_grad():  # what the transform and the anchor generator do at img_dim: fixed from now on
            batch, _ = t([torch.zeros(3, img_dim, img_dim)])
            feats = _features(model.backbone, batch.tensors)
            anchors = model.anchor_generator(batch, feats)[0]
        self.resized = tuple(int(s) for s in batch.image_sizes[0])
        self.padded = tuple(int(s) for s in batch.tensors.shape[-2:])
        self.register_buffer("anchors", anchors.float().clone(), persistent=False)
        cells = [f.shape[-2] * f.shape[-1] for f in feats]
        per_cell = anchors.shape[0] // sum(cells)  # anchors per location, as RetinaNet.forward derives it
        self.level_sizes = [c * per_cell for c in cells]
        # transform.postprocess: boxes of the resized image back to the input's pixels (resize_boxes's ratios)
        rh, rw = (torch.tensor(float(img_dim)) / torch.tensor(float(s)) for s in self.resized)
        self.register_buffer("ratio", torch.stack([rw, rh, rw, rh]).float(), persistent=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x = (images - self.mean) / self.std
        if tuple(x.shape[-2:]) != self.resized:
            x = F.interpolate(x, size=self.resized, mode="bilinear", align_corners=False)
        if self.padded != self.resized:
            x = F.pad(x, (0, self.padded[1] - self.resized[1], 0, self.padded[0] - self.resized[0]))
        out = self.head(_features(self.backbone, x))
        if self.kind == "ssd":
            boxes, scores, labels = self._ssd(out)
        else:
            boxes, scores, labels = self._per_level(out)
        return select_detections(boxes * self.ratio, scores, labels, self.num_classes, self.conf_thres,
                                 self.iou_thres, self.max_det)

    def _decode(self, reg: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        n, t, _ = reg.shape
        if self.kind == "fcos":
            boxes = self.box_coder.decode(reg, anchors)
        else:  # decode_single is 2-D only; row by row it is elementwise, so flattening changes nothing
            boxes = self.box_coder.decode_single(reg.reshape(-1, 4), anchors.reshape(-1, 4)).reshape(n, t, 4)
        return clip_boxes_to_image(boxes, self.resized)

    def _ssd(self, out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        reg, logits = out["bbox_regression"], out["cls_logits"]
        n, a, _ = reg.shape
        boxes = self._decode(reg, self.anchors.unsqueeze(0).expand(n, -1, -1))
        scores = F.softmax(logits, dim=-1)[..., 1:].transpose(1, 2)  # (N, K, A): class 0 is background
        top_s, top_i = scores.topk(min(self.topk, a), dim=2)  # per class, as SSD.postprocess_detections
        k, t = top_s.shape[1], top_s.shape[2]
        cand = torch.gather(boxes, 1, top_i.reshape(n, k * t, 1).expand(-1, -1, 4))
        labels = torch.arange(1, k + 1, device=reg.device).view(1, k, 1).expand(n, k, t).reshape(n, k * t)
        return cand, top_s.reshape(n, k * t), labels

    def _per_level(self, out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = out["cls_logits"].split(self.level_sizes, dim=1)
        regs = out["bbox_regression"].split(self.level_sizes, dim=1)
        ctrs = out["bbox_ctrness"].split(self.level_sizes, dim=1) if self.kind == "fcos" else [None] * len(regs)
        anchors = self.anchors.split(self.level_sizes, dim=0)
        all_boxes, all_scores, all_labels = [], [], []
        for logit, reg, ctr, anc in zip(logits, regs, ctrs, anchors):
            n, _, k = logit.shape
            s = torch.sigmoid(logit) if ctr is None else torch.sqrt(torch.sigmoid(logit) * torch.sigmoid(ctr))
            s = s.flatten(1)
            top_s, top_i = s.topk(min(self.topk, s.shape[1]), dim=1)  # per level, as postprocess_detections
            anchor_i = torch.div(top_i, k, rounding_mode="floor")
            sel = torch.gather(reg, 1, anchor_i.unsqueeze(-1).expand(-1, -1, 4))
            all_boxes.append(self._decode(sel, anc[anchor_i]))
            all_scores.append(top_s)
            all_labels.append(top_i % k + 1)  # K sigmoid outputs; LabelsFromOne's labels 1..K
        return torch.cat(all_boxes, 1), torch.cat(all_scores, 1), torch.cat(all_labels, 1)
