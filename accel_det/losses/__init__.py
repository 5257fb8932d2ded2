"""Criteria of the native models; each returns ``dict[str, Tensor]`` of named losses."""

from accel_det.losses.multibox import MultiBoxLoss, match

__all__ = ["MultiBoxLoss", "match"]
