"""LR schedules with warmup, defined in optimizer steps of one process.

``LRFactor`` is the closed-form factor for ``torch.optim.lr_scheduler.LambdaLR`` (torch's chainable
schedulers compute cosine recursively, which a resume cannot jump into). The factor at step k is a pure
function of k, so it is the same for 1 or N processes, and a resume only needs ``jump_to_step``.
The scheduler must NOT go through ``accelerator.prepare``: the prepared wrapper steps it num_processes
times per optimizer step (accelerate #2926 / #2318).

Warmup follows detectron2's ``WarmupMultiStepLR``: the warmup factor multiplies the main schedule and the
milestones count from step 0 (not from the end of warmup).

During warmup two more things ramp linearly, as in YOLO's train loop: the momentum (SGD ``momentum``, Adam
``betas[0]``) from ``scheduler.warmup_momentum`` to the optimizer's value (a high momentum on the large,
noisy first gradients overshoots), and, with ``scheduler.warmup_bias_lr > 0``, the LR of the ``bias``
group from ``warmup_bias_lr`` down (or up) to its scheduled LR (biases are cheap to move and a high early LR
lets the classifier's background bias settle fast). Both are pure functions of the step, like the LR.
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
        # (step, progress) from where the schedule runs to its end at total_steps: a time budget re-times the
        # rest of the run at a step, keeping the progress reached there (set_length); (0, 0) = from the start
        self.anchor: tuple[int, float] = (0, 0.0)

    def progress(self, step: int) -> float:
        """How far into the schedule ``step`` is, 0 to 1: linear from the anchor to ``total_steps`` (before the
        anchor, linear from 0: those steps are past and not asked for again)."""
        s0, u0 = self.anchor
        if step < s0:
            return u0 * step / s0
        return min(1.0, u0 + (step - s0) * (1.0 - u0) / max(self.total_steps - s0, 1))

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
            t = self.progress(step)
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
        return 1.0  # constant

    def __call__(self, step: int) -> float:
        return self.warmup(step) * self.main(step)


class BiasLRFactor:
    """The bias group's LR factor: from ``start`` (warmup_bias_lr / base LR) at step 0 linearly to the main
    schedule's factor at ``warmup_iters`` (YOLO's ``np.interp`` over the warmup), then the main schedule."""

    def __init__(self, main: LRFactor, start: float) -> None:
        self.main_factor = main
        self.start = start

    def __call__(self, step: int) -> float:
        w = self.main_factor.warmup_iters
        scheduled = self.main_factor.main(step)
        if step >= w:
            return scheduled
        alpha = step / w
        return self.start * (1 - alpha) + scheduled * alpha


def momentum_at(step: int, warmup_iters: int, start: float, target: float) -> float:
    """The momentum at ``step``: ``start`` ramped linearly to ``target`` over the warmup.

    A ``target`` of 0 (plain SGD, or Adam with beta1 = 0) stays 0: the recipe turned momentum off, and a
    warmup must not turn it on.
    """
    if step >= warmup_iters or target == 0:
        return target
    alpha = step / warmup_iters
    return start * (1 - alpha) + target * alpha


class WarmupLR(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR (one factor per param group) that also sets each group's momentum for the step."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, lr_lambdas: list[Any], warmup_iters: int, warmup_momentum: float
    ) -> None:
        # set before LambdaLR.__init__: it takes the first step(), which sets the momentum of step 0
        self.warmup_iters = warmup_iters
        self.warmup_momentum = warmup_momentum
        # the optimizer's own (configured) momentum, read before any step changes it
        self.base_momentums = [_get_momentum(g) for g in optimizer.param_groups]
        super().__init__(optimizer, lr_lambdas)

    def step(self, epoch: int | None = None) -> None:  # epoch: torch's deprecated argument, unused
        super().step()
        self.set_momentum(self.last_epoch)

    def set_momentum(self, step: int) -> None:
        for group, target in zip(self.optimizer.param_groups, self.base_momentums, strict=True):
            if target is not None:
                _set_momentum(group, momentum_at(step, self.warmup_iters, self.warmup_momentum, target))


def _get_momentum(group: dict[str, Any]) -> float | None:
    if "betas" in group:
        return float(group["betas"][0])
    return float(group["momentum"]) if "momentum" in group else None


def _set_momentum(group: dict[str, Any], value: float) -> None:
    if "betas" in group:
        group["betas"] = (value, group["betas"][1])
    else:
        group["momentum"] = value


def current_momentum(optimizer: torch.optim.Optimizer) -> float | None:
    """The first param group's momentum (SGD) or beta1 (Adam/AdamW), for the log; None without one."""
    return _get_momentum(optimizer.param_groups[0])


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Each param group's current LR by its name (``decay``, ``no_decay``, ``bias``; ``group<i>`` unnamed)."""
    return {str(g.get("name", f"group{i}")): float(g["lr"]) for i, g in enumerate(optimizer.param_groups)}


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Any, steps_per_epoch: int, max_epoch: int) -> WarmupLR:
    """``cfg`` is ``[scheduler]``; epoch-valued milestones/step_size become optimizer steps here.

    With ``cfg.warmup_bias_lr > 0`` the optimizer must have a ``bias`` group (``build_optimizer(...,
    bias_group=True)``).
    """
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
    lambdas: list[Any] = [factor] * len(optimizer.param_groups)
    if cfg.warmup_bias_lr > 0 and cfg.warmup_iters > 0:
        names = [g.get("name") for g in optimizer.param_groups]
        if "bias" not in names:
            raise ValueError("scheduler.warmup_bias_lr > 0 needs the optimizer built with bias_group=True")
        i = names.index("bias")
        # the group's base LR, before LambdaLR records it as initial_lr
        lambdas[i] = BiasLRFactor(factor, cfg.warmup_bias_lr / optimizer.param_groups[i]["lr"])
    return WarmupLR(optimizer, lambdas, cfg.warmup_iters, cfg.warmup_momentum)


def set_length(scheduler: torch.optim.lr_scheduler.LambdaLR, total_steps: int, step: int,
               anchor: tuple[int, float] | None = None) -> tuple[int, float]:
    """Make the schedule end at ``total_steps`` and put the LR of ``step`` in the optimizer: a time budget
    re-plans the run's epochs while it trains (engine/budget.py). The rest of the schedule is re-timed from
    ``step``, which keeps the progress it had reached: the LR goes on from where it is, without a jump, and
    reaches the schedule's end at ``total_steps``. Only the cosine has a length to fit (a budget refuses the
    epoch-valued milestones and step_size); warmup stays in steps. ``anchor``: the (step, progress) a saved
    plan re-timed at, restored as it was. Returns the anchor now in force (a checkpoint keeps it)."""
    factors = []
    for fn in scheduler.lr_lambdas:  # the bias group's factor follows the main one it holds
        factor = fn.main_factor if isinstance(fn, BiasLRFactor) else fn
        if not isinstance(factor, LRFactor):
            raise TypeError(f"set_length needs the schedule of build_scheduler, not {type(factor).__name__}")
        factors.append(factor)
    new = anchor if anchor is not None else (step, factors[0].progress(step))
    for factor in factors:
        factor.anchor, factor.total_steps = (int(new[0]), float(new[1])), max(1, total_steps)
    jump_to_step(scheduler, step)
    return factors[0].anchor


def jump_to_step(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Put a freshly built schedule at optimizer step ``step`` (after a resume, after the optimizer's state
    was loaded: that state holds the LR and momentum of the step it was saved at, maybe mid-warmup).

    The schedule is rebuilt from the recipe rather than restored from the checkpoint, so extending
    ``train.max_epoch`` or moving milestones on resume takes effect (LambdaLR's own state_dict would
    silently bring back the old ones); LR and momentum are pure functions of the step, so nothing else is
    needed.
    """
    scheduler.last_epoch = step
    for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(step)
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]
    if isinstance(scheduler, WarmupLR):
        scheduler.set_momentum(step)
