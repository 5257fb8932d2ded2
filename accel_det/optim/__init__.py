from accel_det.optim.ema import ModelEMA
from accel_det.optim.loss_scale import grad_scaler_kwargs
from accel_det.optim.optimizer import build_optimizer, param_groups
from accel_det.optim.scheduler import (
    LRFactor,
    WarmupLR,
    build_scheduler,
    current_momentum,
    group_lrs,
    jump_to_step,
    momentum_at,
)

__all__ = [
    "LRFactor",
    "ModelEMA",
    "WarmupLR",
    "build_optimizer",
    "build_scheduler",
    "current_momentum",
    "grad_scaler_kwargs",
    "group_lrs",
    "jump_to_step",
    "momentum_at",
    "param_groups",
]
