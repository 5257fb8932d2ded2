"""Weight init of native models (``model.init``) and the classification-bias prior of their heads."""

from __future__ import annotations

import math

import torch
from torch import nn

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Linear)
_NORMS = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)


@torch.no_grad()
def init_weights(module: nn.Module, mode: str) -> None:
    """``"xavier"``: Xavier-normal conv/linear weights, bias 0 (the seed's FaceBoxes/YOLO init);
    ``"kaiming"``: He-normal fan_out as torchvision/YOLO backbones, bias 0; ``"default"``: keep what
    each layer's constructor did (torchvision backbones already init themselves). Norm layers get
    weight 1, bias 0 in both explicit modes.

    FaceBoxes.PyTorch draws BN-followed (bias-free) convs from N(0, 0.01) instead. BN makes that
    scale-free for SGD, but Adam's steps have a fixed size, so 0.01-sized weights change by tens of
    percent per step at lr 1e-3; Xavier everywhere trains with both optimizers.
    """
    if mode == "default":
        return
    if mode not in ("xavier", "kaiming"):
        raise ValueError(f"unknown init {mode!r}; known: default, xavier, kaiming")
    for m in module.modules():
        if isinstance(m, _CONVS):
            if mode == "kaiming":
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            else:
                nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, _NORMS) and getattr(m, "weight", None) is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def background_bias(num_classes: int, prior: float = 0.01) -> float:
    """Background logit (object logits 0) so each object class starts at probability ``prior``.

    Softmax analogue of RetinaNet's focal init ``b = -log((1 - p) / p)`` (Lin et al. 2017 §4.1): with
    ~1000 background priors per object, a uniform start makes the first steps' loss huge and unstable.
    P(class k) = p for every object class means P(background) = 1 - K p, hence
    b_bg = log((1 - K p) / p). If K p >= 1 no such split exists and we fall back to a uniform start.
    """
    p = float(prior)
    if not 0.0 < p < 1.0 or num_classes * p >= 1.0:
        return 0.0
    return math.log((1.0 - num_classes * p) / p)


@torch.no_grad()
def init_conf_bias(conv: nn.Conv2d, num_classes: int, prior: float = 0.01, sigmoid: bool = False) -> None:
    """Set a conf head's bias: channel c predicts class ``c % (K + 1)`` (class 0 = background). ``sigmoid``: the
    object channels are independent sigmoids (model.cls_loss qfl/vfl; the background channel is unused), each
    starting at ``prior`` as in RetinaNet."""
    if conv.bias is None:
        raise ValueError("the classification head needs a bias for the prior init")
    k1 = num_classes + 1
    if conv.out_channels % k1:
        raise ValueError(f"conf head has {conv.out_channels} channels, not a multiple of K+1 = {k1}")
    bias = torch.zeros(conv.out_channels)
    if sigmoid:
        bias.fill_(-math.log((1.0 - prior) / prior))
        bias[0::k1] = 0.0
    else:
        bias[0::k1] = background_bias(num_classes, prior)
    conv.bias.copy_(bias)
