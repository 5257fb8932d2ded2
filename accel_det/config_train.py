"""``[train]`` and its sub-tables (``[train.ema]``, ``train.loss_scale``, ``[[train.callbacks]]``), and where a
callback's module is looked up. Torch-free, like config.py (which re-exports ``TrainConfig``).

A callback's module is looked up (``find_target_module``) and later imported (``import_target``) with the
working directory on the path, as ``python -m accel_det.train`` has it: ``accel-det validate`` and the
``accel-det`` console script do not, and a ``my_hooks.py`` next to the recipe must be found by every entry
point alike.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from importlib.machinery import ModuleSpec, PathFinder
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    SerializerFunctionWrapHandler,
    Strict,
    field_validator,
    model_serializer,
    model_validator,
)

from accel_det.config_types import KeyedError, NonNegFloat, PosFloat, PosInt, StrictBool, StrictInt, Table

DecayRate = Annotated[float, Strict(), Field(gt=0, lt=1)]  # (0, 1): an EMA decay of 0 or 1 averages nothing

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
TARGET_RE = re.compile(rf"({_IDENT}(?:\.{_IDENT})*):({_IDENT}(?:\.{_IDENT})*)")


class EmaConfig(Table):
    enabled: StrictBool = Field(False, description="Keep an EMA of the weights; eval, best and exports use it")
    decay: DecayRate = Field(0.9999, description="EMA decay per optimizer step, in (0, 1)")
    warmup: NonNegFloat = Field(
        2000.0, description="Ramp: decay * (1 - exp(-updates / warmup)), as YOLO's ModelEMA (0 = no ramp)"
    )


class LossScaleConfig(Table):
    init: PosFloat = Field(65536.0, description="fp16 GradScaler: initial loss scale")
    growth_interval: PosInt = Field(2000, description="fp16 GradScaler: steps without overflow before it grows")


class CallbackConfig(Table):
    target: str = Field(description="A hook class as 'package.module:Class', built at start with kwargs")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the class")

    @field_validator("target")
    @classmethod
    def _findable(cls, v: str) -> str:
        m = TARGET_RE.fullmatch(v)
        if m is None:
            raise ValueError(f"{v!r} should look like 'package.module:Class'")
        if find_target_module(m.group(1)) is None:
            raise ValueError(f"module {m.group(1)!r} not found (on sys.path or in the working directory)")
        return v


def find_target_module(name: str) -> ModuleSpec | None:
    """The spec of module ``name`` without importing it or its parent packages.

    ``importlib.util.find_spec("a.b")`` imports ``a`` (running its ``__init__``, which may import torch:
    validation must stay torch-free), so only the top-level name goes through the import system and each
    submodule is looked up in its parent's search locations.
    """
    if name in sys.modules:
        return getattr(sys.modules[name], "__spec__", None)
    parts = name.split(".")
    try:
        spec = importlib.util.find_spec(parts[0]) or PathFinder.find_spec(parts[0], [os.getcwd()])
        for i in range(1, len(parts)):
            if spec is None or spec.submodule_search_locations is None:
                return None
            full, where = ".".join(parts[: i + 1]), list(spec.submodule_search_locations)
            spec = None
            for finder in sys.meta_path:  # editable installs map packages with their own finders
                find = getattr(finder, "find_spec", None)
                spec = find(full, where) if find is not None else None
                if spec is not None:
                    break
    except (ImportError, ValueError):
        return None
    # a bare folder is a namespace package: importable, but it holds no class
    return spec if spec is not None and spec.origin not in (None, "namespace") else None


def import_target(target: str) -> Any:
    """Import ``'package.module:Class'`` (the working directory on the path, as validation looked)."""
    m = TARGET_RE.fullmatch(target)
    if m is None:
        raise ValueError(f"{target!r} should look like 'package.module:Class'")
    module_name, attr = m.groups()
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)  # last: a module of the working dir never shadows an installed one
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


class TrainConfig(Table):
    max_epoch: PosInt = Field(30, description="Epochs to train (exclusive with time_budget_minutes)")
    time_budget_minutes: PosFloat | None = Field(
        None,
        description="Train for this long instead of max_epoch epochs: the epochs are planned from the measured "
        "epoch and evaluation times, the LR schedule and [[data.stages]] are fitted to them (README: Time budget)",
    )
    accumulation_freq: PosInt = Field(1, description="Batches per optimizer step (gradient accumulation)")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="'auto' takes the launcher's setting"
    )
    gpu_train: Literal["auto"] | StrictBool = Field(
        "auto", description="true: require a GPU; false: CPU (Accelerator(cpu=True)); 'auto': GPU if visible"
    )
    seed: StrictInt = Field(0, description="Seed for torch/numpy/python on every process")
    clip_grad_norm: NonNegFloat = Field(0.0, description="Max grad norm (0 = off)")
    log_freq: PosInt = Field(10, description="Batches between plain log lines when stdout is not a TTY")
    cudnn_benchmark: StrictBool = Field(True, description="torch.backends.cudnn.benchmark")
    loss_fp32: StrictBool = Field(True, description="Compute native models' losses in fp32 under autocast")
    channels_last: Literal["auto"] | StrictBool = Field(
        "auto",
        description="Model weights in channels_last (NHWC) memory format; auto: on for the models it speeds up "
        "(MobileNet/FaceBoxes/ResNet-18 heads: 1.1-1.5x on CPU, BENCHMARKS.md), off for the others",
    )
    compile: StrictBool = Field(
        False, description="torch.compile the model (MindYOLO ms_jit); falls back to eager with a note if it fails"
    )
    max_nonfinite: PosInt = Field(20, description="Non-finite steps in a row (each skipped) that stop the run")
    loss_scale: LossScaleConfig = Field(default_factory=LossScaleConfig)
    profile_steps: list[PosInt] = Field(
        default_factory=list, description="[start, end]: optimizer steps to record with torch.profiler"
    )
    ema: EmaConfig = Field(default_factory=EmaConfig)
    callbacks: list[CallbackConfig] = Field(
        default_factory=list, description="User hooks: [[train.callbacks]] target = 'pkg.module:Class', kwargs"
    )

    @model_validator(mode="after")
    def _one_length(self) -> TrainConfig:
        # explicitly set only: the default max_epoch is no choice to conflict with
        if self.time_budget_minutes is not None and "max_epoch" in self.model_fields_set:
            raise KeyedError("time_budget_minutes", "exclusive with train.max_epoch, which is set too: a run lasts "
                             "either so many epochs or so many minutes; remove one of the two keys")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # recipe.json of a budgeted run must validate again: without max_epoch's unused default in it
        out = handler(self)
        if self.time_budget_minutes is not None:
            out.pop("max_epoch", None)
        return out

    @field_validator("profile_steps")
    @classmethod
    def _span(cls, v: list[int]) -> list[int]:
        if v and (len(v) != 2 or v[0] > v[1]):
            raise ValueError(f"must be [] or [start, end] with 0 < start <= end, got {v}")
        return v
