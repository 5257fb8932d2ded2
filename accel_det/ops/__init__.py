"""Tensor operations with no dependency on the rest of accel_det (models and losses both import them)."""

from accel_det.ops.boxes import BoxCoder, cxcywh_to_xyxy, decode, encode, xyxy_to_cxcywh

__all__ = ["BoxCoder", "cxcywh_to_xyxy", "decode", "encode", "xyxy_to_cxcywh"]
