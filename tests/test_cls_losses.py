"""model.cls_loss: quality focal / varifocal losses against hand values, the MultiBox targets they get (the matched
class at the decoded box's IoU, every other entry 0), and sigmoid scores in the eager and exported post-process."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from accel_det.config_io import load_recipe
from accel_det.losses.multibox import MultiBoxLoss
from accel_det.losses.quality import quality_focal_loss, varifocal_loss

LN3 = math.log(3.0)  # sigmoid(ln 3) = 0.75


def test_quality_focal_loss_hand_values() -> None:
    logits = torch.tensor([0.0, LN3, 0.0])
    score = torch.tensor([1.0, 0.0, 0.6])
    # BCE(0.5, 1) = ln 2, |1 - 0.5|^2 = 0.25 | BCE(0.75, 0) = -ln 0.25, 0.75^2 | BCE(0.5, 0.6) = ln 2, 0.1^2
    hand = torch.tensor([math.log(2) * 0.25, -math.log(0.25) * 0.5625, math.log(2) * 0.01])
    torch.testing.assert_close(quality_focal_loss(logits, score), hand)
    torch.testing.assert_close(quality_focal_loss(logits, score, beta=1.0)[1], torch.tensor(-math.log(0.25) * 0.75))


def test_varifocal_loss_hand_values() -> None:
    logits = torch.tensor([0.0, LN3])
    score = torch.tensor([0.6, 0.0])
    # positive: q * BCE(0.5, 0.6) = 0.6 ln 2 | negative: alpha p^gamma * -ln(1 - p) = 0.75 * 0.5625 * ln 4
    hand = torch.tensor([0.6 * math.log(2), 0.75 * 0.5625 * math.log(4)])
    torch.testing.assert_close(varifocal_loss(logits, score), hand)


def test_quality_losses_are_zero_where_the_score_is_the_target() -> None:
    logits = torch.tensor([-3.0, 0.5, 2.0])
    q = logits.sigmoid()
    assert quality_focal_loss(logits, q).abs().max() < 1e-12
    # VFL's positives are not focal: a correct score still pays its BCE (the entropy of q), weighted by q
    assert (varifocal_loss(logits, q) > 0).all()


# Two priors; zero offsets decode prior 0 to (0.4, 0.4, 0.6, 0.6). The ground truth (0.45, 0.45, 0.65, 0.65), label
# 2 of K = 3, overlaps it with IoU 0.0225 / 0.0575; match_iou 0.3 leaves prior 0 positive only through SSD's
# best-prior step. Prior 1 (far away) is background: all its targets are 0.
PRIORS = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]])
IOU = 0.0225 / 0.0575


@pytest.mark.parametrize("kind", ["qfl", "vfl"])
def test_multibox_quality_targets(kind: str) -> None:
    g = torch.Generator().manual_seed(0)
    conf = torch.randn(1, 2, 4, generator=g)  # K + 1 = 4 channels; channel 0 (background) takes no part
    loc = torch.zeros(1, 2, 4)
    targets = [{"boxes": torch.tensor([[0.45, 0.45, 0.65, 0.65]]), "labels": torch.tensor([2])}]
    out = MultiBoxLoss(cls_loss=kind, match_iou=0.3)(loc, conf, PRIORS, targets)
    target = torch.zeros(2, 3)
    target[0, 1] = IOU  # label 2 -> object channel 1
    fn = quality_focal_loss if kind == "qfl" else varifocal_loss
    hand = fn(conf[0, :, 1:], target).sum()  # one positive: divided by 1
    torch.testing.assert_close(out["loss_cls"], hand)
    conf_bg = conf.clone()
    conf_bg[..., 0] = 100.0
    assert torch.equal(MultiBoxLoss(cls_loss=kind, match_iou=0.3)(loc, conf_bg, PRIORS, targets)["loss_cls"],
                       out["loss_cls"])


def test_multibox_quality_loss_with_an_image_without_objects() -> None:
    conf = torch.zeros(2, 2, 4, requires_grad=True)
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
               {"boxes": torch.tensor([[0.45, 0.45, 0.65, 0.65]]), "labels": torch.tensor([1])}]
    out = MultiBoxLoss(cls_loss="qfl", match_iou=0.3)(torch.zeros(2, 2, 4), conf, PRIORS, targets)
    assert torch.isfinite(out["loss_cls"])
    out["loss_cls"].backward()
    # the empty image's priors are trained towards 0 on every class (no mining: every prior counts)
    assert (conf.grad[0, :, 1:] > 0).all() and (conf.grad[..., 0] == 0).all()


def test_unknown_cls_loss_is_refused() -> None:
    with pytest.raises(ValueError, match="cls_loss must be one of ce, qfl, vfl"):
        MultiBoxLoss(cls_loss="focal")


def test_recipe_key_reaches_criterion_postprocess_and_bias() -> None:
    from accel_det.models import build_model

    recipe = load_recipe("recipes/demo.toml", ["model.img_dim=64", "model.cls_loss='vfl'"])
    model, _ = build_model(recipe)
    assert model.criterion.cls_loss == "vfl" and model.postprocess.sigmoid
    conv = next(iter(model.net.classification_convs()))
    bias = conv.bias.detach().view(-1, 4)  # (anchors, K + 1)
    torch.testing.assert_close(bias[:, 1:].sigmoid(), torch.full_like(bias[:, 1:], 0.01))  # RetinaNet's prior
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 64))[0]
    assert out["scores"].numel() and (out["scores"] <= 1).all() and ((out["labels"] >= 1) & (out["labels"] <= 3)).all()
    default, _ = build_model(load_recipe("recipes/demo.toml", ["model.img_dim=64"]))
    assert default.criterion.cls_loss == "ce" and not default.postprocess.sigmoid


def test_sigmoid_scores_export_equal_eager(tmp_path: Path) -> None:
    from test_export import assert_batch_independent_and_eager, make_run

    from accel_det.export import export_run

    run_dir = make_run(tmp_path, "ssdlite_mobilenet_v3", 96, "model.cls_loss='qfl'")
    out = export_run(run_dir)  # the export's own check: batch 1 and 4 against eager
    g = torch.Generator().manual_seed(1)
    assert_batch_independent_and_eager(out, run_dir, torch.rand(4, 3, 96, 96, generator=g))
