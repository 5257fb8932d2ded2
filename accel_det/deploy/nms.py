"""Per-class NMS inside an exported graph, and the padded selection every exported detector ends with.

NMS has a data-dependent output size, which neither ``torch.export`` nor a fixed-shape graph likes. So the graph
calls one custom op, ``accel_det::nms_keep``, whose output has a fixed shape: a (N, T) mask of the candidates
that survive. In ONNX it becomes the standard ``NonMaxSuppression`` (one call for the whole batch: ONNX NMS
treats each batch entry on its own, so no box offsets are shared between images) plus a ``ScatterND`` back to
the mask. In eager mode and in a ``.pt2`` program it runs torchvision's ``batched_nms`` image by image.

The semantics are the eager post-processing's (models/native.py ``PostProcess``, torchvision's detectors):
a candidate passes with ``score > conf_thres`` (strict), is suppressed by a better one of its class when
``IoU > iou_thres`` (strict), and the survivors are ordered by score. Ties go to the earlier candidate: ONNX
``TopK`` and onnxruntime's NMS both prefer the lower index, and the candidates arrive sorted by score, so a
tie is decided by candidate order everywhere in the graph.
"""

from __future__ import annotations

import torch
from torchvision.ops import batched_nms

# a score no candidate has: masks out other classes' slots and the padding (real scores are in [0, 1])
NO_SCORE = -1.0


@torch.library.custom_op("accel_det::nms_keep", mutates_args=())
def nms_keep(
    boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, score_threshold: float, max_per_class: int
) -> torch.Tensor:
    """boxes (N, T, 4) xyxy, scores (N, K, T) -> (N, T) bool: which candidates survive per-class NMS.

    The arguments are ONNX ``NonMaxSuppression``'s. ``max_per_class`` only bounds onnxruntime's work: the
    caller keeps at most that many detections in all, so a class's later survivors could never be kept and
    this eager version does not truncate.
    """
    n, k, t = scores.shape
    keep = torch.zeros(n, t, dtype=torch.bool, device=scores.device)
    for i in range(n):  # image by image: nothing is shared between the images of a batch
        cls, cand = torch.nonzero(scores[i] > score_threshold, as_tuple=True)
        if cand.numel() == 0:
            continue
        kept = batched_nms(boxes[i, cand].float(), scores[i, cls, cand].float(), cls, iou_threshold)
        keep[i, cand[kept]] = True
    return keep


@nms_keep.register_fake
def _(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, score_threshold: float,
      max_per_class: int) -> torch.Tensor:
    return scores.new_empty((scores.shape[0], scores.shape[2]), dtype=torch.bool)


def nms_keep_onnx(boxes, scores, iou_threshold: float, score_threshold: float, max_per_class: int):  # noqa: ANN001, ANN201
    """The ONNX translation of :func:`nms_keep` (onnxscript, traced by the dynamo exporter)."""
    from onnxscript import opset18 as op

    selected = op.NonMaxSuppression(
        boxes,
        scores,
        op.Constant(value_ints=[max_per_class]),
        op.Constant(value_floats=[iou_threshold]),
        op.Constant(value_floats=[score_threshold]),
    )  # (S, 3): batch index, class index, box index
    where = op.Gather(selected, op.Constant(value_ints=[0, 2]), axis=1)  # (S, 2): batch, box
    size = op.Gather(op.Shape(scores), op.Constant(value_ints=[0, 2]), axis=0)  # (N, T)
    hits = op.Expand(op.Constant(value_float=1.0), op.Gather(op.Shape(where), op.Constant(value_ints=[0]), axis=0))
    mask = op.ScatterND(op.ConstantOfShape(size), where, hits)  # float zeros: ScatterND on bool is not everywhere
    return op.Greater(mask, op.Constant(value_float=0.5))


ONNX_TRANSLATIONS = {torch.ops.accel_det.nms_keep.default: nms_keep_onnx}


def select_detections(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    conf_thres: float,
    iou_thres: float,
    max_det: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidates (N, T) sorted by score per image -> the contract's padded outputs.

    ``boxes`` (N, T, 4) xyxy pixels, ``scores`` (N, T), ``labels`` (N, T) int64 1..K. Returns ``boxes``
    (N, max_det, 4), ``scores`` (N, max_det), ``labels`` (N, max_det), ``num_dets`` (N,): per image the
    ``num_dets`` best survivors by score, then zeros (label 0) as padding. Every step is per image (row-wise
    TopK and gathers, batched ONNX NMS), so an image's detections never depend on the rest of the batch.
    """
    n = scores.shape[0]
    classes = torch.arange(1, num_classes + 1, device=labels.device).view(1, num_classes, 1)
    # ONNX NMS wants (N, K, T) class scores over shared boxes: each candidate scores only in its own class
    per_class = torch.where(labels.unsqueeze(1) == classes, scores.unsqueeze(1), NO_SCORE)
    keep = torch.ops.accel_det.nms_keep(boxes, per_class, float(iou_thres), float(conf_thres), int(max_det))
    # max_det slots of padding behind the candidates: TopK(max_det) works even with fewer candidates
    ranked = torch.cat([torch.where(keep, scores, NO_SCORE), scores.new_full((n, max_det), NO_SCORE)], dim=1)
    top_s, top_i = ranked.topk(max_det, dim=1)  # sorted; ties to the lower index, i.e. the earlier candidate
    valid = top_s > NO_SCORE / 2
    out_boxes = torch.cat([boxes, boxes.new_zeros((n, max_det, 4))], dim=1)
    out_boxes = torch.gather(out_boxes, 1, top_i.unsqueeze(-1).expand(-1, -1, 4))
    out_labels = torch.gather(torch.cat([labels, labels.new_zeros((n, max_det))], dim=1), 1, top_i)
    return (
        torch.where(valid.unsqueeze(-1), out_boxes, 0.0),
        torch.where(valid, top_s, 0.0),
        torch.where(valid, out_labels, 0),
        valid.sum(dim=1),
    )
