"""Hooks a recipe switches on: the profiler (``train.profile_steps``) and user callbacks (``[[train.callbacks]]``).

Both are plain hooks (engine/hooks.py): the loop does not know they exist.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from accel_det.engine.hooks import Hook, TrainState
from accel_det.engine.progress import RunLog
from accel_det.errors import RecipeError

HOOK_POINTS = ("before_train", "after_step", "after_epoch", "after_train")


class ProfilerHook(Hook):
    """Records optimizer steps ``start..end`` (1-based, inclusive) with ``torch.profiler``: a Chrome trace per
    process under ``RUN_DIR/profile/`` (open it in chrome://tracing or Perfetto) and the top operators once,
    in the log. Steps before ``start`` are not recorded: the first steps pay for allocator growth and cuDNN
    autotuning, which is not what a profile of training should show."""

    def __init__(self, start: int, end: int, accelerator: Accelerator, run_dir: Path, log: RunLog) -> None:
        self.start, self.end = start, end
        self.accelerator = accelerator
        self.out = run_dir / "profile"
        self.log = log
        self.profiler: torch.profiler.profile | None = None

    def _begin(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(activities=activities, record_shapes=True)
        self.profiler.__enter__()

    def before_train(self, state: TrainState) -> None:
        if state.global_step + 1 >= self.start and state.global_step < self.end:
            self._begin()  # a resume inside the window records the rest of it

    def after_step(self, state: TrainState) -> None:
        if state.global_step == self.start - 1 and self.profiler is None:
            self._begin()
        elif state.global_step >= self.end and self.profiler is not None:
            self._finish()

    def after_train(self, state: TrainState) -> None:
        if self.profiler is not None:  # the run ended inside the window
            self._finish()

    def _finish(self) -> None:
        assert self.profiler is not None
        prof, self.profiler = self.profiler, None
        prof.__exit__(None, None, None)
        self.out.mkdir(parents=True, exist_ok=True)
        trace = self.out / f"trace_steps_{self.start}-{self.end}_rank{self.accelerator.process_index}.json"
        prof.export_chrome_trace(str(trace))
        if self.accelerator.is_main_process:
            key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            self.log.info(f"profile of optimizer steps {self.start}-{self.end}: {trace} (one file per process)")
            self.log.info(prof.key_averages().table(sort_by=key, row_limit=15))


class _Callback(Hook):
    """A user object under the hook protocol: the hook points it defines are called, the others skipped."""

    def __init__(self, target: Any) -> None:
        self.target = target
        for point in HOOK_POINTS:
            fn = getattr(target, point, None)
            if callable(fn):
                setattr(self, point, fn)


def build_callbacks(specs: list[Any], context: dict[str, Any]) -> list[Hook]:
    """``[[train.callbacks]]`` -> hooks. ``target = "package.module:Class"`` is imported and called with the
    table's ``kwargs``, plus, for each of its constructor parameters named like a key of ``context``
    (``accelerator``, ``model``, ``optimizer``, ``run_dir``, ``log``, ``recipe``), that object: a callback
    gets what it needs in its constructor, as the built-in hooks do. Problems name the key."""
    import inspect

    hooks: list[Hook] = []
    for n, spec in enumerate(specs):
        key = f"train.callbacks.{n}.target"
        module_name, _, attr = spec.target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise RecipeError(f"{key}: cannot import {module_name!r}: {exc}") from None
        cls = getattr(module, attr, None)
        if not callable(cls):
            raise RecipeError(f"{key}: {module_name!r} has no class or function {attr!r}")
        try:
            params = inspect.signature(cls).parameters
        except (TypeError, ValueError):  # a builtin or extension type without a signature
            params = {}
        given = {name: value for name, value in context.items() if name in params and name not in spec.kwargs}
        try:
            target = cls(**spec.kwargs, **given)
        except TypeError as exc:
            raise RecipeError(f"{key}: {spec.target}(**kwargs) failed: {exc}") from None
        if not any(callable(getattr(target, point, None)) for point in HOOK_POINTS):
            raise RecipeError(f"{key}: {spec.target} defines none of the hook points {', '.join(HOOK_POINTS)}")
        hooks.append(target if isinstance(target, Hook) else _Callback(target))
    return hooks
