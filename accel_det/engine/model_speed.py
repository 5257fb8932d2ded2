"""Training-speed options that change how the model runs, never what it computes: ``train.channels_last`` and
``train.compile``. Applied in ``setup`` before ``accelerator.prepare``; neither changes the state_dict's keys,
so checkpoints and exported files are the same with or without them."""

from __future__ import annotations

import torch
from torch import nn

from accel_det.config import Recipe
from accel_det.engine.progress import RunLog
from accel_det.errors import describe

# Models whose training step is faster with channels_last weights (one CPU thread, BENCHMARKS.md "Channels
# last"): oneDNN runs the depthwise-separable MobileNet blocks and FaceBoxes' small convolutions 1.4-1.5x faster
# in NHWC, the ResNet-18 SSD-lite 1.1x. ResNet-50 RetinaNet and Faster R-CNN were neutral (0.98x, 1.04x): "auto"
# leaves them, and anything not measured, as they are.
CHANNELS_LAST_AUTO = frozenset(
    {"ssdlite_mobilenet_v3", "ssdlite_resnet18", "faceboxes", "tv_ssdlite320_mobilenet_v3_large"}
)


def use_channels_last(recipe: Recipe) -> bool:
    setting = recipe.train.channels_last
    if setting == "auto":
        # a timm backbone is not one of the measured networks
        return recipe.model.name in CHANNELS_LAST_AUTO and not recipe.model.backbone
    return bool(setting)


def apply_memory_format(model: nn.Module, recipe: Recipe) -> nn.Module:
    """Weights (4-d parameters) to channels_last. Inputs stay NCHW: a convolution with channels_last weights
    returns channels_last, so the format spreads from the first layer on without copying the batch."""
    if not use_channels_last(recipe):
        return model
    return model.to(memory_format=torch.channels_last)


def _compiled_part(model: nn.Module) -> tuple[str, nn.Module]:
    """The part worth compiling: the network without the loss and the post-processing, whose box matching and
    NMS have data-dependent shapes that break graphs (native models: ``net``; torchvision: ``backbone``)."""
    for name in ("net", "backbone"):
        part = getattr(model, name, None)
        if isinstance(part, nn.Module):
            return name, part
    return "model", model


def compile_model(model: nn.Module, recipe: Recipe, log: RunLog) -> None:
    """``train.compile``: ``torch.compile`` the network in place (``nn.Module.compile``: the state_dict keeps its
    keys). Compilation is lazy, so one inference forward on a blank batch here makes it fail now rather than in
    the first training step; if it fails (no C++ compiler for inductor, an op dynamo cannot trace), the model
    runs eagerly and the log says why. Eval mode: the dry run must not move BatchNorm statistics."""
    if not recipe.train.compile:
        return
    name, part = _compiled_part(model)
    part.compile()
    dim, channels = recipe.model.img_dim, recipe.model.channels
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, channels, dim, dim, device=next(model.parameters()).device))
    except Exception as exc:  # noqa: BLE001 - any compile failure means: run eagerly, and say why
        part._compiled_call_impl = None  # what nn.Module.compile set: back to the eager forward
        log.info(f"note: train.compile: compiling {name} failed, training eagerly: {describe(exc)}")
    else:
        log.info(f"train.compile: {name} compiled with torch.compile (the first steps compile the training graph)")
    finally:
        model.train(was_training)
