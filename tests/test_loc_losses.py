"""model.loc_loss: the IoU losses of MultiBox against values computed by hand."""

from __future__ import annotations

import pytest
import torch

from accel_det.config_io import load_recipe
from accel_det.losses.multibox import MultiBoxLoss

# One prior (cx, cy, w, h) = (0.5, 0.5, 0.2, 0.2); zero offsets decode to the box (0.4, 0.4, 0.6, 0.6). The
# ground truth (0.45, 0.45, 0.65, 0.65) overlaps it 0.15 x 0.15 = 0.0225; union 0.04 + 0.04 - 0.0225 = 0.0575,
# IoU = 0.0225 / 0.0575; the enclosing box (0.4, 0.4, 0.65, 0.65) has area 0.0625 and diagonal^2 0.125; the
# centres are (0.05, 0.05) apart (0.005 squared); both boxes are squares, so CIoU's aspect term is 0.
IOU = 0.0225 / 0.0575
HAND = {
    "giou": 1 - (IOU - (0.0625 - 0.0575) / 0.0625),
    "diou": 1 - IOU + 0.005 / 0.125,
    "ciou": 1 - IOU + 0.005 / 0.125,
}


def _loss(kind: str, loc: torch.Tensor, gt: list[float], weight: float = 1.0) -> dict[str, torch.Tensor]:
    criterion = MultiBoxLoss(loc_loss=kind, loc_weight=weight)
    priors = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    conf = torch.zeros(1, 1, 2)
    targets = [{"boxes": torch.tensor([gt]), "labels": torch.tensor([1])}]
    return criterion(loc, conf, priors, targets)


@pytest.mark.parametrize("kind", ["giou", "diou", "ciou"])
def test_iou_losses_match_hand_values(kind: str) -> None:
    out = _loss(kind, torch.zeros(1, 1, 4), [0.45, 0.45, 0.65, 0.65])
    # one positive prior, no negatives to mine: the loss of that one box
    torch.testing.assert_close(out["loss_loc"], torch.tensor(HAND[kind]), rtol=1e-5, atol=1e-6)
    weighted = _loss(kind, torch.zeros(1, 1, 4), [0.45, 0.45, 0.65, 0.65], weight=2.0)
    torch.testing.assert_close(weighted["loss_loc"], torch.tensor(2 * HAND[kind]), rtol=1e-5, atol=1e-6)


def test_ciou_adds_the_aspect_term() -> None:
    """A 0.2 x 0.4 ground truth on the square prior box: CIoU = DIoU + alpha * v with
    v = 4 / pi^2 * (atan(w / h) - atan(w' / h'))^2 and alpha = v / (1 - IoU + v)."""
    gt = [0.4, 0.3, 0.6, 0.7]  # same centre: the distance term is 0
    iou = 0.04 / 0.08
    v = 4 / torch.pi**2 * (torch.atan(torch.tensor(0.2 / 0.4)) - torch.atan(torch.tensor(1.0))) ** 2
    alpha = v / (1 - iou + v)
    diou = _loss("diou", torch.zeros(1, 1, 4), gt)["loss_loc"]
    ciou = _loss("ciou", torch.zeros(1, 1, 4), gt)["loss_loc"]
    torch.testing.assert_close(diou, torch.tensor(1 - iou), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ciou, 1 - iou + alpha * v, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["giou", "diou", "ciou"])
def test_iou_loss_trains_the_offsets(kind: str) -> None:
    """The gradient reaches the offsets and a few steps move the decoded box onto the ground truth."""
    loc = torch.zeros(1, 1, 4, requires_grad=True)
    opt = torch.optim.SGD([loc], lr=0.5)
    first = None
    for _ in range(30):
        loss = _loss(kind, loc, [0.45, 0.45, 0.65, 0.65])["loss_loc"]
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first


def test_recipe_key_reaches_the_criterion() -> None:
    from accel_det.models import build_model

    recipe = load_recipe("recipes/demo.toml", ["model.img_dim=64", "model.loc_loss='ciou'", "model.loc_weight=2.0"])
    model, _ = build_model(recipe)
    assert model.criterion.loc_loss == "ciou" and model.criterion.loc_weight == 2.0
