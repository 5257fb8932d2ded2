"""IoU-aware classification losses: the class score is trained to be the localisation quality (an IoU), so the
ranking NMS and AP use puts the well-placed box first, not merely the confident one.

Both take sigmoid logits and a soft target ``score`` of the same shape in [0, 1] (0 = negative: background, or
another class than the object's), and return the loss per element (no reduction): the criterion chooses the
normaliser (the number of positives, or the sum of the targets).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def quality_focal_loss(logits: torch.Tensor, score: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """Quality focal loss (GFL, Li et al. 2020, eq. 5): ``-|y - s|^beta * BCE(s, y)`` with ``s = sigmoid(logits)``.

    Focal loss's modulating factor generalised to a continuous target: an element whose score is already near
    its IoU target contributes little, whether the target is 0 (the easy background that swamps one-stage
    detectors) or, say, 0.7 for a positive."""
    bce = F.binary_cross_entropy_with_logits(logits, score, reduction="none")
    return bce * (score - logits.sigmoid()).abs().pow(beta)


def varifocal_loss(
    logits: torch.Tensor, score: torch.Tensor, alpha: float = 0.75, gamma: float = 2.0
) -> torch.Tensor:
    """Varifocal loss (VarifocalNet, Zhang et al. 2021, eq. 2): positives (``score > 0``) weighted by their IoU
    target ``q`` (``-q * BCE(p, q)``), negatives down-weighted focally (``-alpha * p^gamma * log(1 - p)``).

    Unlike focal loss it does not down-weight the positives: they are rare, and the high-IoU ones are the ones
    whose score should rise most."""
    p = logits.sigmoid()
    weight = torch.where(score > 0, score, alpha * p.pow(gamma))
    return F.binary_cross_entropy_with_logits(logits, score, reduction="none") * weight
