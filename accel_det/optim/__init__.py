from accel_det.optim.optimizer import build_optimizer, param_groups
from accel_det.optim.scheduler import LRFactor, build_scheduler, jump_to_step

__all__ = ["LRFactor", "build_optimizer", "build_scheduler", "jump_to_step", "param_groups"]
