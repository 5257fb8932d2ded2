"""An exponential moving average of the weights (``[train.ema]``), as YOLO's ``ModelEMA``, on
``torch.optim.swa_utils.AveragedModel``.

After the k-th optimizer step (k = 1, 2, ...) every floating parameter and buffer (BatchNorm running stats
included: eval-mode BN must use statistics of the averaged weights, not of the live ones) becomes::

    ema = d_k * ema + (1 - d_k) * weights,   d_k = decay * (1 - exp(-k / warmup))   (d_k = decay if warmup = 0)

starting from the weights the EMA was built from. The ramp matters: with a fixed 0.9999 the average of a
from-scratch run would still be ~90% random init after 1000 steps. Integer buffers (BN's
``num_batches_tracked``) are counts, not averaged: they follow the model.

The update count lives in the AveragedModel's ``n_averaged`` buffer (= updates + 1: building the EMA is its
first "average", a copy), so ``state_dict()`` carries it and a resumed run continues the same ramp.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def _bare(model: nn.Module) -> nn.Module:
    """The module itself, not a DDP or torch.compile wrapper (their parameters are the same tensors)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


class ModelEMA:
    """``update(model)`` after each optimizer step; ``module`` for evaluation and saving."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: float = 2000.0) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"train.ema.decay: must be in (0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self._updates = 0  # mirrors n_averaged - 1 on the host: reading the buffer would sync the GPU every step
        self.averaged = AveragedModel(_bare(model), multi_avg_fn=self._average, use_buffers=True)
        module = self.averaged.module
        # accelerate's mixed precision sets an instance ``forward`` (autocast around the class's). deepcopy
        # rebinds a bound method to the copy, but a plain closure (accelerate's other branch) still calls the
        # *original* model: the "EMA" would evaluate the live weights. Drop any that is not the copy's own.
        for key in ("forward", "_original_forward"):
            attr = module.__dict__.get(key)
            if attr is not None and getattr(attr, "__self__", None) is not module:
                del module.__dict__[key]
        module.requires_grad_(False)
        module.eval()
        self.averaged.n_averaged.fill_(1)  # the deepcopy above was the first "average"

    @property
    def module(self) -> nn.Module:
        """The averaged model (eval mode, no grads): evaluate, save and export this one."""
        return self.averaged.module

    @property
    def updates(self) -> int:
        """Optimizer steps averaged so far."""
        return self._updates

    def decay_at(self, update: int) -> float:
        """d_k of the k-th update (1-based)."""
        if self.warmup == 0:
            return self.decay
        return self.decay * (1 - math.exp(-update / self.warmup))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Average in ``model``'s current weights and buffers (call once per optimizer step taken)."""
        self._updates += 1
        self.averaged.update_parameters(_bare(model))

    def _average(self, ema: list[torch.Tensor], current: list[torch.Tensor], num_averaged: Any) -> None:
        # AveragedModel calls this once per (device, dtype) group
        if not ema[0].is_floating_point():
            torch._foreach_copy_(ema, current)
            return
        d = self.decay_at(self._updates)
        # YOLO's two in-place ops (v *= d; v += (1 - d) * w), not lerp: the same rounding as the formula
        torch._foreach_mul_(ema, d)
        torch._foreach_add_(ema, current, alpha=1 - d)

    def state_dict(self) -> dict[str, Any]:
        """The averaged weights and buffers (``module.*``) and the count (``n_averaged`` = updates + 1)."""
        return self.averaged.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.averaged.load_state_dict(state_dict)
        self._updates = int(self.averaged.n_averaged) - 1
