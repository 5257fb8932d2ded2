"""The fp16 loss scaler's settings from ``train.loss_scale``, for ``Accelerator(kwargs_handlers=[...])``.

Accelerate builds the GradScaler only under fp16 (bf16 and fp32 need none), so the handler is harmless to
pass always. torch's defaults are the recipe's defaults: 2**16 and 2000 steps.
"""

from __future__ import annotations

from typing import Any

from accelerate.utils import GradScalerKwargs


def grad_scaler_kwargs(cfg: Any) -> GradScalerKwargs:
    """``cfg`` is ``train.loss_scale`` (``init``, ``growth_interval``)."""
    return GradScalerKwargs(init_scale=float(cfg.init), growth_interval=int(cfg.growth_interval))
