"""The model registry. Every builder takes the validated Recipe and returns an ``nn.Module`` that follows
torchvision's detection contract (docs/architecture.md, Contracts):

* ``forward(images, targets=None)``; ``images`` is a float tensor (N, C, H, W) in [0, 1] (or a list of
  (C, H, W) tensors), ``targets`` a list of ``{"boxes": float (n, 4) xyxy abs px, "labels": int64 1..K}``;
* train mode returns ``dict[str, Tensor]`` of named losses (the trainer sums them);
* eval mode returns ``list[{"boxes", "scores", "labels"}]`` in input-image pixels, post-processed with
  the recipe's ``eval.conf_thres``, ``eval.iou_thres`` and ``eval.max_det``.
"""

from __future__ import annotations

from accel_det.registry import Registry

MODELS: Registry = Registry("model")
