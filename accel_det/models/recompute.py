"""``model.recompute``: activation checkpointing of the first N backbone stages of a native model.

A recomputed stage keeps only its input for backward and runs its forward again there
(``torch.utils.checkpoint``, non-reentrant: it works when the input needs no grad, as images don't, and
with DDP). The loss and the gradients are the same; the stage's activations are not held between forward
and backward, and the early stages, at the highest resolution, hold the largest ones.

The trap: the second forward is a training-mode forward, so every BatchNorm in the stage would update its
running statistics twice per step (a different momentum than the recipe's, and EMA/eval would see it). The
recomputation restores the BatchNorm buffers it found (a few KB). Turning tracking off instead would
change which tensors BatchNorm saves for backward, and the checkpoint matches recomputed tensors to the
first forward's by position.

What a stage is, per model, is listed in ``accel_det.catalog`` (``NativeModelInfo.stages``); the net that
owns the stages has ``stage_names`` and a ``recompute`` count, and runs each stage through
:func:`run_stage`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from accel_det.errors import RecipeError


@contextmanager
def _bn_stats_kept(owner: nn.Module) -> Iterator[None]:
    buffers = [
        b
        for m in owner.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for b in (m.running_mean, m.running_var, m.num_batches_tracked)
        if b is not None
    ]
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        # also after checkpoint's early stop, which ends the recomputation with an exception
        with torch.no_grad():
            for b, v in zip(buffers, saved, strict=True):
                b.copy_(v)


def _contexts(owner: nn.Module) -> tuple[AbstractContextManager[None], AbstractContextManager[None]]:
    return nullcontext(), _bn_stats_kept(owner)  # (first forward, recomputation)


def run_stage(
    owner: nn.Module, stage: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, recompute: bool
) -> torch.Tensor:
    """``stage(x)``, recomputed in backward when ``recompute`` and ``owner`` trains with grads enabled."""
    if recompute and owner.training and torch.is_grad_enabled():
        return checkpoint(stage, x, use_reentrant=False, context_fn=partial(_contexts, owner))
    return stage(x)


def stage_owner(net: nn.Module) -> nn.Module:
    """The module with the stages: an SSD-lite net's backbone, FaceBoxes' net itself."""
    backbone = getattr(net, "backbone", None)
    return backbone if backbone is not None and hasattr(backbone, "stage_names") else net


def set_recompute(net: nn.Module, n: int, model_name: str = "this model") -> None:
    """Recompute the first ``n`` backbone stages of ``net`` (a native net; 0 = none)."""
    owner = stage_owner(net)
    names = tuple(getattr(owner, "stage_names", ()))
    if n > len(names):
        have = f"{len(names)} backbone stages ({', '.join(names)})" if names else "no recomputable stages"
        raise RecipeError(f"model.recompute: {n} but {model_name} has {have}")
    if names:
        owner.recompute = n
