"""The anchor-free detector (models/anchor_free.py, losses/anchor_free.py, deploy/anchor_free.py): points, the
task-aligned assigner and DFL on hand cases, decode, the criterion on awkward batches, the model contract, its
recipe keys and its export."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from accel_det.config_io import load_recipe
from accel_det.errors import RecipeError
from accel_det.losses.anchor_free import (
    TaskAlignedLoss,
    anchor_points,
    decode_distances,
    distribution_focal_loss,
    distribution_to_distances,
    task_aligned_assign,
)
from accel_det.models import build_model

NAME = "afdet_mobilenet_v3"


def _recipe(*extra: str):  # noqa: ANN202
    return load_recipe(None, [f"model.name='{NAME}'", "model.img_dim=128", "data.class_names=['a', 'b']", *extra])


def test_points_of_a_two_level_map() -> None:
    points, strides = anchor_points([(2, 3), (1, 2)], (4, 8))
    # row-major per level (how the heads flatten a map), the finer level first
    assert points.tolist() == [[2, 2], [6, 2], [10, 2], [2, 6], [6, 6], [10, 6], [4, 4], [12, 4]]
    assert strides.tolist() == [4, 4, 4, 4, 4, 4, 8, 8]


def test_task_aligned_assigner_on_a_hand_case() -> None:
    # box A = [0, 20] x [0, 10] (class 1), box B = [10, 40] x [0, 10] (class 2), a degenerate box between them;
    # points along y = 5 at x = 5 (inside A), 15 (inside both), 25, 35 (inside B), 50 (outside both)
    points = torch.tensor([[5.0, 5.0], [15.0, 5.0], [25.0, 5.0], [35.0, 5.0], [50.0, 5.0]])
    gt = torch.tensor([[[0.0, 0.0, 20.0, 10.0], [12.0, 0.0, 12.0, 10.0], [10.0, 0.0, 40.0, 10.0]]])
    labels = torch.tensor([[1, 1, 2]])
    mask = torch.tensor([[True, False, True]])
    # predictions: IoU with A / B = 0.8 / 0.15, 0.25 / 1, 0 / 2/3, 0 / 1/3, 0 / 0
    pred = torch.tensor([[[0.0, 0.0, 16.0, 10.0], [10.0, 0.0, 40.0, 10.0], [20.0, 0.0, 40.0, 10.0],
                          [30.0, 0.0, 40.0, 10.0], [45.0, 0.0, 55.0, 10.0]]])
    scores = torch.full((1, 5, 2), 0.5)
    fg, idx, t_hat = task_aligned_assign(scores, pred, points, gt, labels, mask, topk=2)
    # A's top 2 by t = s * u^6: points 0 and 1; B's: points 1 and 2; point 1 overlaps B more, so B keeps it
    assert fg.tolist() == [[True, True, True, False, False]]
    assert idx[fg].tolist() == [0, 2, 2]
    # t / max t of the box * max IoU of the box's positives: A (0.8 alone) -> 0.8; B -> 1 and (2/3)^6
    torch.testing.assert_close(t_hat, torch.tensor([[0.8, 1.0, (2 / 3) ** 6, 0.0, 0.0]]))
    # with top-1 the B box keeps only its best point, the one point 1 was disputed for
    fg1, idx1, _ = task_aligned_assign(scores, pred, points, gt, labels, mask, topk=1)
    assert fg1.tolist() == [[True, True, False, False, False]] and idx1[fg1].tolist() == [0, 2]
    # an image whose boxes are all padding: nothing positive
    fg0, _, t0 = task_aligned_assign(scores, pred, points, gt, labels, torch.zeros_like(mask), topk=2)
    assert not fg0.any() and not t0.any()


def test_scores_drive_the_assignment() -> None:
    # two points inside one box with the same IoU: the top-1 is the one scoring the box's class higher
    points = torch.tensor([[5.0, 5.0], [15.0, 5.0]])
    gt = torch.tensor([[[0.0, 0.0, 20.0, 10.0]]])
    pred = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [10.0, 0.0, 20.0, 10.0]]])
    scores = torch.tensor([[[0.9, 0.2], [0.2, 0.9]]])
    fg, _, _ = task_aligned_assign(scores, pred, points, gt, torch.tensor([[2]]), torch.tensor([[True]]), topk=1)
    assert fg.tolist() == [[False, True]]


def test_dfl_against_a_hand_value() -> None:
    logits = torch.tensor([0.0, 1.0, 2.0, 0.0, 0.0])
    # target 1.3: 0.7 on bin 1, 0.3 on bin 2; log-sum-exp = log(3 + e + e^2)
    lse = math.log(3 + math.e + math.e**2)
    expected = 0.7 * (lse - 1.0) + 0.3 * (lse - 2.0)
    got = distribution_focal_loss(logits, torch.tensor(1.3))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # an integer target is all on its own bin
    assert distribution_focal_loss(logits, torch.tensor(2.0)).item() == pytest.approx(lse - 2.0, rel=1e-6)


def test_decode_of_a_one_hot_distribution() -> None:
    logits = torch.full((4, 17), -1e4)
    logits[torch.arange(4), torch.tensor([2, 3, 1, 4])] = 0.0  # l, t, r, b = 2, 3, 1, 4 strides
    dist = distribution_to_distances(logits)
    assert dist.tolist() == [2.0, 3.0, 1.0, 4.0]
    box = decode_distances(dist * 8, torch.tensor([20.0, 12.0]))
    assert box.tolist() == [4.0, -12.0, 28.0, 44.0]


@pytest.mark.parametrize("cls_loss", ["vfl", "qfl"])
def test_criterion_keys_and_awkward_batches(cls_loss: str) -> None:
    torch.manual_seed(0)
    points, strides = anchor_points([(4, 4), (2, 2)], (8, 16))
    n, p, k, r = 3, points.shape[0], 2, 16
    cls = torch.randn(n, p, k, requires_grad=True)
    reg = torch.randn(n, p, 4, r + 1, requires_grad=True)
    targets = [
        {"boxes": torch.tensor([[2.0, 3.0, 20.0, 25.0], [5.0, 5.0, 5.0, 9.0]]), "labels": torch.tensor([1, 2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},  # no objects
        {"boxes": torch.tensor([[0.0, 0.0, 32.0, 32.0]]), "labels": torch.tensor([2])},
    ]
    crit = TaskAlignedLoss(reg_max=r, cls_loss=cls_loss)
    losses = crit(cls, reg, points, strides, targets)
    assert set(losses) == {"loss_cls", "loss_box", "loss_dfl"}
    assert all(v.dim() == 0 and torch.isfinite(v) and v > 0 for v in losses.values()), losses
    sum(losses.values()).backward()
    assert torch.isfinite(cls.grad).all() and torch.isfinite(reg.grad).all()
    assert reg.grad[1].abs().sum() == 0  # the empty image has no positives to regress
    assert cls.grad[1].abs().sum() > 0  # ... but its background is still trained
    # a batch without any box (or only degenerate ones): the box terms are 0, still connected to the graph
    empty = [{"boxes": torch.tensor([[4.0, 4.0, 4.0, 8.0]]), "labels": torch.tensor([1])}, targets[1], targets[1]]
    losses = crit(cls, reg, points, strides, empty)
    assert losses["loss_box"].item() == 0 and losses["loss_dfl"].item() == 0 and losses["loss_cls"] > 0
    sum(losses.values()).backward()


def test_unknown_classification_loss_is_refused() -> None:
    with pytest.raises(ValueError, match="cls_loss must be one of vfl, qfl"):
        TaskAlignedLoss(cls_loss="ce")


def test_forward_backward_and_detections_at_128() -> None:
    torch.manual_seed(0)
    model, _ = build_model(_recipe("eval.conf_thres=0.0", "eval.max_det=7"))
    assert model.net.strides == (8, 16, 32)
    assert model.criterion.cls_loss == "vfl"  # model.cls_loss's default "ce" has no sigmoid form: vfl
    bias = model.net.cls_out[0].bias
    assert torch.allclose(bias.sigmoid(), torch.full_like(bias, 0.01))
    model.train()
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 70.0, 90.0], [60.0, 20.0, 120.0, 60.0]]), "labels": torch.tensor([1, 2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    losses = model(torch.rand(2, 3, 128, 128), targets)
    assert set(losses) == {"loss_cls", "loss_box", "loss_dfl"}
    sum(losses.values()).backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]
    model.eval()
    h, w = 128, 96
    with torch.no_grad():
        out = model(torch.rand(2, 3, h, w))
    for det in out:
        n = len(det["boxes"])
        assert 0 < n <= 7
        assert ((det["labels"] >= 1) & (det["labels"] <= 2)).all()
        x1, y1, x2, y2 = det["boxes"].unbind(1)
        assert ((x1 >= 0) & (x1 <= x2) & (x2 <= w) & (y1 >= 0) & (y1 <= y2) & (y2 <= h)).all()
        assert (det["scores"].diff() <= 0).all()


def test_the_model_learns_a_box() -> None:
    """A few steps on one image move the score and the box towards the object (the parts fit together)."""
    torch.manual_seed(0)
    model, _ = build_model(_recipe("eval.conf_thres=0.0", "eval.max_det=1", "model.cls_loss='qfl'"))
    x = torch.zeros(2, 3, 128, 128)
    x[:, :, 32:96, 40:104] = 1.0
    targets = [{"boxes": torch.tensor([[40.0, 32.0, 104.0, 96.0]]), "labels": torch.tensor([2])}] * 2
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    first = None
    for _ in range(30):
        losses = model(x, targets)
        loss = sum(losses.values())
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_recipe_keys() -> None:
    r = _recipe()
    assert r.model.anchors is None and r.model.feature_strides() == (8, 16, 32)
    with pytest.raises(RecipeError, match="model.anchors: afdet_mobilenet_v3 is anchor-free"):
        _recipe("model.anchors.clip=true")
    with pytest.raises(RecipeError, match="model.backbone: afdet_mobilenet_v3 has only its own backbone"):
        _recipe("model.backbone='timm:resnet18'")
    with pytest.raises(RecipeError, match="model.recompute: 6 but afdet_mobilenet_v3 has 5 backbone stages"):
        _recipe("model.recompute=6")
    with pytest.raises(RecipeError, match="model.img_dim"):
        _recipe("model.img_dim=32", "data.batch_size=1")
    model, _ = build_model(_recipe("model.recompute=2", "model.channels=1"))
    assert model.net.backbone.recompute == 2
    model.train()
    losses = model(torch.rand(2, 1, 96, 96), [{"boxes": torch.tensor([[4.0, 4.0, 50.0, 60.0]]),
                                                "labels": torch.tensor([1])}] * 2)
    assert all(torch.isfinite(v) for v in losses.values())


def test_onnx_export_equals_eager(tmp_path: Path) -> None:
    from test_export import _noise, assert_batch_independent_and_eager, make_run

    from accel_det.deploy.runner import ExportedDetector
    from accel_det.export import export_run

    run_dir = make_run(tmp_path, NAME, 96)
    out = export_run(run_dir)  # checks batch 1 and 4 on the val images itself
    assert ExportedDetector(out).meta["model"] == NAME
    assert_batch_independent_and_eager(out, run_dir, _noise(4, 96, seed=1))
    dyn = export_run(run_dir, dynamic_size=True, out=tmp_path / "dyn.onnx")
    assert ExportedDetector(dyn).meta["input"]["min_side"] == 33
    x = torch.rand(4, 3, 100, 136, generator=torch.Generator().manual_seed(2))  # not multiples of 32
    assert_batch_independent_and_eager(dyn, run_dir, x)
