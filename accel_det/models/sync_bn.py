"""``model.sync_bn``: BatchNorm statistics over the global batch instead of each process's share.

With small per-GPU batches (detection at high resolution) each process's BatchNorm sees a few images and
its statistics are noisy; SyncBatchNorm all-reduces them. It only means something with several processes,
and torch implements it for GPUs only (its forward refuses CPU tensors once a process group exists), so
anything else keeps BatchNorm and says why in one line.
"""

from __future__ import annotations

import torch
from torch import nn

# SyncBatchNorm.forward's own list (torch 2.x), plus the custom backend it also accepts
_SYNC_DEVICES = ("cuda", "hpu", "xpu")


def convert_sync_bn(
    model: nn.Module, num_processes: int, device: torch.device | str | None = None
) -> tuple[nn.Module, str]:
    """(the model with SyncBatchNorm, or unchanged, and a one-line note for the log).

    Call before ``accelerator.prepare`` (DDP must wrap the converted modules) and before the EMA is built;
    the parameters are the same tensors, so an optimizer built earlier still holds them.
    """
    if num_processes <= 1:
        return model, "model.sync_bn: one process, BatchNorm kept (nothing to synchronise)"
    kind = torch.device(device).type if device is not None else "cuda"
    if kind not in (*_SYNC_DEVICES, torch._C._get_privateuse1_backend_name()):
        return model, f"model.sync_bn: SyncBatchNorm needs GPUs (running on {kind}), BatchNorm kept"
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if any(type(m).__module__.startswith("timm.") for m in norms):
        # timm's BatchNormAct2d holds its activation: torch's converter would drop it (models/timm_backbone.py)
        from timm.layers import convert_sync_batchnorm

        model = convert_sync_batchnorm(model)
    else:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    count = len(norms)
    return model, f"model.sync_bn: {count} BatchNorm layers -> SyncBatchNorm over {num_processes} processes"
