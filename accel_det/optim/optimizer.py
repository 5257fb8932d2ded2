"""Optimizers from ``[optimizer]``, with weight decay kept off norm layers and biases.

Decaying BN/GN/LN scales and biases only shrinks them towards zero for no regularisation benefit (Goyal et
al. 2017, "Accurate, Large Minibatch SGD", §5.1; timm/torchvision references do the same).

Every param group carries a ``name`` (``decay``, ``no_decay``, ``bias``), which the scheduler (the bias
LR warmup) and the model summary read; torch optimizers keep extra keys in a group untouched.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def param_groups(
    model: nn.Module, weight_decay: float, no_decay_norm_bias: bool, bias_group: bool = False
) -> list[dict[str, Any]]:
    """Trainable parameters as groups ``decay`` / ``no_decay`` / ``bias`` (empty ones left out).

    ``bias_group``: every parameter named ``bias`` (norm layers' too, as YOLO's g2) in a group of its own, for
    ``scheduler.warmup_bias_lr``; without ``no_decay_norm_bias`` it keeps the weight decay.
    """
    split = no_decay_norm_bias and weight_decay != 0
    groups: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": [], "bias": []}
    seen: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if bias_group and name == "bias":
                groups["bias"].append(p)
            elif split and (isinstance(module, _NORMS) or name == "bias" or p.ndim <= 1):
                groups["no_decay"].append(p)
            else:
                groups["decay"].append(p)
    decay = {"decay": weight_decay, "no_decay": 0.0, "bias": 0.0 if split else weight_decay}
    return [{"params": ps, "weight_decay": decay[k], "name": k} for k, ps in groups.items() if ps]


def build_optimizer(model: nn.Module, cfg: Any, *, bias_group: bool = False) -> torch.optim.Optimizer:
    """``cfg`` is ``[optimizer]``; pass ``bias_group = scheduler.warmup_bias_lr > 0``."""
    groups = param_groups(model, cfg.weight_decay, cfg.no_decay_norm_bias, bias_group)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    raise ValueError(f"unknown optimizer {cfg.name!r}")
