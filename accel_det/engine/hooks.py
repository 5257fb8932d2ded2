"""The loop's hook points (``before_train``, ``after_step``, ``after_epoch``, ``after_train``) and the built-in
hooks. As in detectron2, a hook is built with what it needs and is handed only the ``TrainState`` when called.

Every process enters every hook. Collectives (gather_for_metrics, save_state, wait_for_everyone, broadcast)
run on all; only file writes, printing and COCOeval are main-process-only (docs/architecture.md, "Hooks").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from torch import nn

from accel_det.engine.checkpoint import Checkpointer
from accel_det.engine.distributed import write_json_atomic
from accel_det.engine.evaluator import Evaluator
from accel_det.engine.progress import RunLog


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint's trainer_state.json."""

    epoch: int = 0  # completed epochs
    global_step: int = 0  # optimizer steps of one process
    best_metric: float | None = None
    best_epoch: int | None = None
    last_metric: float | None = None
    last_is_best: bool = False

    def to_dict(self, **extra: Any) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "batch_in_epoch": 0,  # checkpoints are taken at epoch ends
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            **extra,
        }


class Hook:
    def before_train(self, state: TrainState) -> None: ...
    def after_step(self, state: TrainState) -> None: ...
    def after_epoch(self, state: TrainState) -> None: ...
    def after_train(self, state: TrainState) -> None: ...


def is_scorable(value: float | None) -> bool:
    """pycocotools reports -1 (and VOC nan) when val has no ground truth: such a number is never "best"."""
    return value is not None and math.isfinite(value) and value >= 0


class EvalHook(Hook):
    """mAP every ``eval.freq`` epochs and after the last one; decides which epoch is ``best``."""

    def __init__(self, evaluator: Evaluator, eval_cfg: Any, max_epoch: int, run_dir: Path, log: RunLog) -> None:
        self.evaluator = evaluator
        self.cfg = eval_cfg
        self.max_epoch = max_epoch
        self.eval_dir = run_dir / "eval"
        self.log = log
        self._said_unscorable = False

    def due(self, epoch: int) -> bool:
        if not self.cfg.compute_map:
            return False
        return epoch >= self.max_epoch or (self.cfg.freq > 0 and epoch % self.cfg.freq == 0)

    def after_epoch(self, state: TrainState) -> None:
        state.last_metric, state.last_is_best = None, False
        if not self.due(state.epoch):
            return
        out = self.evaluator()
        state.last_metric = out.headline
        if is_scorable(out.headline):
            assert out.headline is not None
            if state.best_metric is None or out.headline > state.best_metric:
                state.best_metric, state.best_epoch, state.last_is_best = out.headline, state.epoch, True
        elif not self._said_unscorable:
            self._said_unscorable = True
            self.log.info(f"note: {self.cfg.metric} is undefined ({out.headline}): the val split has no ground "
                          "truth to score, so no checkpoint is marked 'best'")
        if out.result is None:  # not the main process
            return
        tag = f"epoch_{state.epoch:04d}"
        self.eval_dir.mkdir(exist_ok=True)
        write_json_atomic(self.eval_dir / f"{tag}.json", {"epoch": state.epoch, "step": state.global_step,
                                                           **out.result})
        write_json_atomic(self.eval_dir / f"predictions_{tag}.json", out.coco_results())
        self.log.print_table(out.result, title=f"{self.cfg.metric} @ epoch {state.epoch}")
        flat = {k: v for k, v in out.result.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        self.log.event({"event": "eval", "epoch": state.epoch, "step": state.global_step, **flat,
                        "per_class": out.result.get("per_class")}, step=state.global_step)


class CheckpointHook(Hook):
    """``save_state`` every ``output.checkpoint_freq`` epochs, at the end, and whenever eval found a new best.

    ``extra_state`` adds what the loop knows beyond ``TrainState`` (LR, process count, epoch length)."""

    def __init__(self, checkpointer: Checkpointer, output_cfg: Any, max_epoch: int, recipe_json: dict[str, Any],
                 extra_state: Callable[[], dict[str, Any]], log: RunLog) -> None:
        self.checkpointer = checkpointer
        self.cfg = output_cfg
        self.max_epoch = max_epoch
        self.recipe_json = recipe_json
        self.extra_state = extra_state
        self.log = log

    def after_epoch(self, state: TrainState) -> None:
        periodic = self.cfg.checkpoint_freq > 0 and state.epoch % self.cfg.checkpoint_freq == 0
        best = self.cfg.save_best and state.last_is_best
        if periodic or best or state.epoch >= self.max_epoch:
            trainer_state = state.to_dict(last_metric=state.last_metric, **self.extra_state())
            # each checkpoint says what model it holds, whatever the run dir's recipe.json says later
            path = self.checkpointer.save(state.epoch, trainer_state, is_best=best, recipe=self.recipe_json)
            self.log.info(f"checkpoint: {path}" + (" (best)" if best else ""))


class FinalWeightsHook(Hook):
    """``model.safetensors`` in the run dir at the end: the final weights for ``predict`` and other tools."""

    def __init__(self, accelerator: Accelerator, model: nn.Module, run_dir: Path) -> None:
        self.accelerator = accelerator
        self.model = model
        self.run_dir = run_dir

    def after_train(self, state: TrainState) -> None:
        self.accelerator.wait_for_everyone()
        self.accelerator.save_model(self.model, str(self.run_dir), safe_serialization=True)
