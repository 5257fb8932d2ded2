"""The fast paths of the data pipeline draw from the same distributions as the torchvision transforms they
replace (benchmarks/data_pipeline.py has the speed)."""

from __future__ import annotations

import math

import torch
from torchvision import tv_tensors
from torchvision.ops import box_iou
from torchvision.transforms import v2

from accel_det.data.transforms import BatchedIoUCrop


def _sample(h: int = 96, w: int = 128) -> list:
    image = tv_tensors.Image(torch.zeros(3, h, w, dtype=torch.uint8))
    boxes = tv_tensors.BoundingBoxes(
        torch.tensor([[10.0, 10.0, 40.0, 50.0], [60.0, 20.0, 120.0, 90.0], [5.0, 70.0, 20.0, 85.0]]),
        format="XYXY", canvas_size=(h, w),
    )
    return [image, boxes]


def _draws(transform: v2.RandomIoUCrop, n: int, seed: int) -> list[dict]:
    torch.manual_seed(seed)
    return [transform.make_params(_sample()) for _ in range(n)]


def test_batched_iou_crop_keeps_the_ssd_sampler_rules() -> None:
    """Every crop it returns is one the one-by-one sampler could return: size in the scale range, aspect in
    range, inside the image, a kept box centre, and the flags mark exactly the boxes whose centre is inside."""
    crop = BatchedIoUCrop()
    inputs = _sample()
    boxes = inputs[1].as_subclass(torch.Tensor)
    for params in _draws(crop, 400, seed=1):
        if not params:
            continue
        top, left, h, w = params["top"], params["left"], params["height"], params["width"]
        assert int(0.3 * 96) <= h <= 96 and int(0.3 * 128) <= w <= 128
        assert 0.5 <= w / h <= 2.0
        assert 0 <= left and left + w <= 128 and 0 <= top and top + h <= 96
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        inside = (left < cx) & (cx < left + w) & (top < cy) & (cy < top + h)
        assert torch.equal(params["is_within_crop_area"], inside) and inside.any()
        iou = box_iou(boxes[inside], torch.tensor([[left, top, left + w, top + h]], dtype=torch.float32))
        assert iou.max() >= 0.0


def test_batched_iou_crop_has_torchvisions_distribution() -> None:
    """Same distribution as torchvision's RandomIoUCrop: the keep-as-is rate and the mean crop geometry agree
    within 4 standard errors over 1500 draws each (different random streams, so not equal draws)."""
    n = 1500
    ours, theirs = _draws(BatchedIoUCrop(), n, seed=2), _draws(v2.RandomIoUCrop(), n, seed=3)

    def keep_rate(draws: list[dict]) -> float:
        return sum(1 for d in draws if not d) / len(draws)

    p1, p2 = keep_rate(ours), keep_rate(theirs)
    se = math.sqrt(p1 * (1 - p1) / n + p2 * (1 - p2) / n)
    assert abs(p1 - p2) < 4 * se, (p1, p2)
    for key in ("top", "left", "height", "width"):
        a = torch.tensor([float(d[key]) for d in ours if d])
        b = torch.tensor([float(d[key]) for d in theirs if d])
        se = math.sqrt(a.var() / len(a) + b.var() / len(b))
        assert abs(a.mean() - b.mean()) < 4 * se, (key, float(a.mean()), float(b.mean()))


def test_batched_iou_crop_is_deterministic_per_seed() -> None:
    def plain(draws: list[dict]) -> list[dict]:
        return [{k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in d.items()} for d in draws]

    assert plain(_draws(BatchedIoUCrop(), 50, seed=4)) == plain(_draws(BatchedIoUCrop(), 50, seed=4))
