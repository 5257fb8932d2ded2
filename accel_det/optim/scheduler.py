"""LR schedules with warmup, defined in optimizer steps of one process.

``LRFactor`` is the closed-form factor for ``torch.optim.lr_scheduler.LambdaLR`` (torch's chainable
schedulers compute cosine recursively, which a resume cannot jump into). The factor at step k is a pure
function of k, so it is the same for 1 or N processes, and a resume only needs ``jump_to_step``.
The scheduler must NOT go through ``accelerator.prepare``: the prepared wrapper steps it num_processes
times per optimizer step (accelerate #2926 / #2318).

Warmup follows detectron2's ``WarmupMultiStepLR``: the warmup factor multiplies the main schedule and the
milestones count from step 0 (not from the end of warmup).
"""

from __future__ import annotations

import bisect
import math
from typing import Any

import torch


class LRFactor:
    def __init__(
        self,
        name: str,
        total_steps: int,
        milestones: list[int] | None = None,
        step_size: int = 0,
        gamma: float = 0.1,
        min_lr_ratio: float = 0.0,
        warmup_iters: int = 0,
        warmup_factor: float = 0.001,
        warmup_method: str = "linear",
    ) -> None:
        self.name = name
        self.total_steps = max(1, total_steps)
        self.milestones = list(milestones or [])
        self.step_size = step_size
        self.gamma = gamma
        self.min_lr_ratio = min_lr_ratio
        self.warmup_iters = warmup_iters
        self.warmup_factor = warmup_factor
        self.warmup_method = warmup_method

    def warmup(self, step: int) -> float:
        if step >= self.warmup_iters:
            return 1.0
        if self.warmup_method == "constant":
            return self.warmup_factor
        alpha = step / self.warmup_iters
        return self.warmup_factor * (1 - alpha) + alpha

    def main(self, step: int) -> float:
        if self.name == "multistep":
            return self.gamma ** bisect.bisect_right(self.milestones, step)
        if self.name == "step":
            return self.gamma ** (step // self.step_size)
        if self.name == "cosine":
            t = min(step, self.total_steps) / self.total_steps
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
        return 1.0  # constant

    def __call__(self, step: int) -> float:
        return self.warmup(step) * self.main(step)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: Any, steps_per_epoch: int, max_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """``cfg`` is ``[scheduler]``; epoch-valued milestones/step_size become optimizer steps here."""
    factor = LRFactor(
        cfg.name,
        total_steps=steps_per_epoch * max_epoch,
        milestones=[m * steps_per_epoch for m in cfg.milestones],
        step_size=cfg.step_size * steps_per_epoch,
        gamma=cfg.gamma,
        min_lr_ratio=cfg.min_lr_ratio,
        warmup_iters=cfg.warmup_iters,
        warmup_factor=cfg.warmup_factor,
        warmup_method=cfg.warmup_method,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def jump_to_step(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Put a freshly built schedule at optimizer step ``step`` (after a resume).

    The schedule is rebuilt from the recipe rather than restored from the checkpoint, so extending
    ``train.max_epoch`` or moving milestones on resume takes effect (LambdaLR's own state_dict would
    silently bring back the old ones); the LR is a pure function of the step, so nothing else is needed.
    """
    scheduler.last_epoch = step
    for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(step)
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]
