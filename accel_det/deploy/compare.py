"""Exported detections vs the eager model's, detection by detection: what the export command's check (and the
tests) call "equal".

Two lists of one image are equal when every detection of each is matched by one of the other: label equal,
score within ``SCORE_TOL``, every box coordinate within ``BOX_TOL`` pixels. Order is not compared: candidates
with exactly equal scores come out of ``torch.topk`` in an unspecified order, out of ONNX ``TopK`` lowest
index first.

Two float backends (torch, onnxruntime) differ in the last bits of a score, so two candidates whose scores are
closer than that may swap places; the score tolerance already says such candidates are interchangeable. Two
consequences are accepted, and counted: a *swap* — two boxes of one class, scores within ``SCORE_TOL``, that
overlap by more than the NMS IoU, so NMS kept the one on one side and the other on the other side — and a
*cut* — with ``max_det`` detections on a side, a detection on the other side scored within ``SCORE_TOL`` of
that side's last one. Anything else unmatched is a mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import box_iou

SCORE_TOL = 1e-4
BOX_TOL = 0.5


@dataclass
class Comparison:
    matched: int = 0
    swaps: int = 0  # NMS near-ties decided the other way
    cuts: int = 0  # near-ties at the max_det boundary
    problem: str = ""  # the first mismatch, empty when equal

    def add(self, other: Comparison) -> None:
        self.matched += other.matched
        self.swaps += other.swaps
        self.cuts += other.cuts
        self.problem = self.problem or other.problem


def _det(d: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return d["boxes"].detach().cpu().float(), d["scores"].detach().cpu().float(), d["labels"].detach().cpu().long()


def _describe(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, i: int) -> str:
    box = ", ".join(f"{v:.1f}" for v in boxes[i].tolist())
    return f"label {int(labels[i])} score {float(scores[i]):.5f} box [{box}]"


def compare_image(eager: dict[str, torch.Tensor], exported: dict[str, torch.Tensor], iou_thres: float,
                  max_det: int) -> Comparison:
    """Compare one image's detections (dicts of boxes, scores, labels; padding already removed)."""
    eb, es, el = _det(eager)
    xb, xs, xl = _det(exported)
    out = Comparison()
    if len(eb) and len(xb):
        close = (
            (el[:, None] == xl[None, :])
            & ((es[:, None] - xs[None, :]).abs() <= SCORE_TOL)
            & ((eb[:, None, :] - xb[None, :, :]).abs().amax(dim=-1) <= BOX_TOL)
        )
    else:
        close = torch.zeros(len(eb), len(xb), dtype=torch.bool)
    e_free = torch.ones(len(eb), dtype=torch.bool)
    x_free = torch.ones(len(xb), dtype=torch.bool)
    for i in es.argsort(descending=True).tolist():  # greedy, best first; ties of equal boxes are equivalent
        hits = torch.nonzero(close[i] & x_free).flatten()
        if len(hits):
            e_free[i] = x_free[hits[0]] = False
            out.matched += 1
    # near-tie NMS swaps: an unmatched pair of one class, scores within tolerance, overlapping past the NMS IoU
    ei, xi = torch.nonzero(e_free).flatten(), torch.nonzero(x_free).flatten()
    if len(ei) and len(xi):
        iou = box_iou(eb[ei], xb[xi])
        for a in range(len(ei)):
            ok = ((el[ei[a]] == xl[xi]) & ((es[ei[a]] - xs[xi]).abs() <= SCORE_TOL) & (iou[a] > iou_thres)
                  & x_free[xi])
            hits = torch.nonzero(ok).flatten()
            if len(hits):
                e_free[ei[a]] = x_free[xi[hits[0]]] = False
                out.swaps += 1
    for free, scores, other_scores, boxes, labels, side in (
        (e_free, es, xs, eb, el, "eager"), (x_free, xs, es, xb, xl, "exported")
    ):
        for i in torch.nonzero(free).flatten().tolist():
            # the other side is full and its last detection ties with this one: cut at max_det differently
            if len(other_scores) >= max_det and float(scores[i]) <= float(other_scores.min()) + SCORE_TOL:
                out.cuts += 1
                continue
            other = "exported" if side == "eager" else "eager"
            out.problem = out.problem or (
                f"{side} detection {_describe(boxes, scores, labels, i)} has no match in the {other} output "
                f"({len(eb)} eager vs {len(xb)} exported detections)"
            )
    return out


def compare_batch(eager: list[dict[str, torch.Tensor]], exported: list[dict[str, torch.Tensor]], iou_thres: float,
                  max_det: int, names: list[str] | None = None) -> Comparison:
    """Compare image by image; ``problem`` names the first image that differs."""
    total = Comparison()
    for i, (e, x) in enumerate(zip(eager, exported, strict=True)):
        c = compare_image(e, x, iou_thres, max_det)
        if c.problem:
            c.problem = f"{names[i] if names else f'image {i}'}: {c.problem}"
        total.add(c)
    return total
