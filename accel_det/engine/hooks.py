"""The loop's hook points (``before_train``, ``after_step``, ``after_epoch``, ``after_train``) and the built-in
hooks. As in detectron2, a hook is built with what it needs and is handed only the ``TrainState`` when called.

Every process enters every hook. Collectives (gather_for_metrics, save_state, wait_for_everyone, broadcast)
run on all; only file writes, printing and COCOeval are main-process-only (docs/architecture.md, "Hooks").
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from torch import nn

from accel_det.engine.checkpoint import Checkpointer, checkpoint_name
from accel_det.engine.evaluator import Evaluator
from accel_det.engine.progress import RunLog
from accel_det.jsonio import write_json_atomic


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint's trainer_state.json."""

    epoch: int = 0  # completed epochs
    global_step: int = 0  # optimizer steps taken (of one process): monotonic, what logs and trackers use
    schedule_step: int = 0  # position in the LR schedule: re-expressed when a resume changes the epoch length
    batch_in_epoch: int = 0  # batches of the current epoch done (0 at an epoch end)
    best_metric: float | None = None
    best_epoch: int | None = None
    last_metric: float | None = None
    last_is_best: bool = False
    # the current epoch's losses so far (already reduced over processes): a mid-epoch resume continues them
    epoch_loss_sums: dict[str, float] = field(default_factory=dict)
    epoch_loss_count: int = 0
    nonfinite_streak: int = 0  # skipped steps in a row (train.max_nonfinite stops the run)
    epoch_hooks_done: bool = True  # False while the epoch-end hooks (evaluation, ...) of `epoch` run
    # the log window a signal interrupted: its losses so far (reduced) and size, continued after a resume
    window_loss_sums: dict[str, float] = field(default_factory=dict)
    window_loss_count: int = 0
    # train.time_budget_minutes: the plan as a checkpoint saved it (engine/budget.py), and while training the
    # function that reads the plan as it is now (the budget used so far goes on growing)
    budget: dict[str, Any] | None = None
    budget_live: Callable[[], dict[str, Any]] | None = field(default=None, repr=False, compare=False)

    def to_dict(self, **extra: Any) -> dict[str, Any]:
        budget = self.budget_live() if self.budget_live is not None else self.budget
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "schedule_step": self.schedule_step,
            "batch_in_epoch": self.batch_in_epoch,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "last_metric": self.last_metric,
            "epoch_loss_sums": self.epoch_loss_sums,
            "epoch_loss_count": self.epoch_loss_count,
            "nonfinite_streak": self.nonfinite_streak,
            "epoch_hooks_done": self.epoch_hooks_done,
            "window_loss_sums": self.window_loss_sums,
            "window_loss_count": self.window_loss_count,
            **({"budget": budget} if budget is not None else {}),
            **extra,
        }


class Hook:
    def planned(self, max_epoch: int) -> None:
        """The run's length: called before training and whenever a time budget re-plans it."""

    def before_train(self, state: TrainState) -> None: ...
    def after_step(self, state: TrainState) -> None: ...
    def after_epoch(self, state: TrainState) -> None: ...
    def after_train(self, state: TrainState) -> None: ...


def is_scorable(value: float | None) -> bool:
    """pycocotools reports -1 (and VOC nan) when val has no ground truth: such a number is never "best"."""
    return value is not None and math.isfinite(value) and value >= 0


class EvalHook(Hook):
    """mAP every ``eval.freq`` epochs and after the last one, on each val split (``val``; ``val2`` with
    ``[data.mix]``, reported separately); ``val`` decides which epoch is ``best``."""

    def __init__(self, evaluators: dict[str, Evaluator], eval_cfg: Any, max_epoch: int, run_dir: Path,
                 log: RunLog) -> None:
        self.evaluators = evaluators
        self.cfg = eval_cfg
        self.max_epoch = max_epoch
        self.eval_dir = run_dir / "eval"
        self.log = log
        self._said_unscorable = False

    def planned(self, max_epoch: int) -> None:
        self.max_epoch = max_epoch  # the last epoch always evaluates

    def due(self, epoch: int) -> bool:
        if not self.cfg.compute_map:
            return False
        return epoch >= self.max_epoch or (self.cfg.freq > 0 and epoch % self.cfg.freq == 0)

    def after_epoch(self, state: TrainState) -> None:
        state.last_metric, state.last_is_best = None, False
        if not self.due(state.epoch):
            return
        for split, evaluator in self.evaluators.items():
            out = evaluator()
            if split == "val":
                self._best(state, out.headline)
            if out.result is not None:  # the main process
                self._report(state, split, out)

    def _best(self, state: TrainState, headline: float | None) -> None:
        state.last_metric = headline
        if is_scorable(headline):
            assert headline is not None
            if state.best_metric is None or headline > state.best_metric:
                state.best_metric, state.best_epoch, state.last_is_best = headline, state.epoch, True
        elif not self._said_unscorable:
            self._said_unscorable = True
            self.log.info(f"note: {self.cfg.metric} is undefined ({headline}): the val split has no ground "
                          "truth to score, so no checkpoint is marked 'best'")

    def _report(self, state: TrainState, split: str, out: Any) -> None:
        result = out.result
        tag = f"epoch_{state.epoch:04d}" + ("" if split == "val" else f"_{split}")
        self.eval_dir.mkdir(exist_ok=True)
        write_json_atomic(self.eval_dir / f"{tag}.json", {"epoch": state.epoch, "step": state.global_step,
                                                           "split": split, **result})
        write_json_atomic(self.eval_dir / f"predictions_{tag}.json", out.coco_results())
        on = "" if split == "val" else f" ({split})"
        self.log.print_table(result, title=f"{self.cfg.metric} @ epoch {state.epoch}{on}")
        if result.get("slow_batches"):
            self.log.info(f"note{on}: {result['slow_batches']} eval batch(es) took longer than eval.nms_time_limit "
                          f"= {self.cfg.nms_time_limit} s (inference + NMS; results are complete)")
        if result.get("num_unreadable"):
            self.log.info(f"warning{on}: {result['num_unreadable']} val image(s) could not be read and are left "
                          "out of the metric")
        flat = {k: v for k, v in result.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        self.log.event({"event": "eval", "split": split, "epoch": state.epoch, "step": state.global_step, **flat,
                        "per_class": result.get("per_class")}, step=state.global_step)


class CheckpointHook(Hook):
    """Saves every ``output.checkpoint_freq`` epochs, after the last, before every evaluation that may find a
    new best (the checkpoint is written before the evaluation runs, so a failing evaluation loses nothing),
    and every ``output.checkpoint_every_steps`` optimizer steps inside an epoch. ``save(state)`` is also what
    the loop calls when a signal stops it. ``extra_state`` adds what the loop knows beyond ``TrainState``."""

    def __init__(self, checkpointer: Checkpointer, output_cfg: Any, max_epoch: int, batches_per_epoch: int,
                 eval_due: Callable[[int], bool], recipe_json: dict[str, Any],
                 extra_state: Callable[[], dict[str, Any]], log: RunLog) -> None:
        self.checkpointer = checkpointer
        self.cfg = output_cfg
        self.max_epoch = max_epoch
        self.batches_per_epoch = batches_per_epoch
        self.eval_due = eval_due
        self.recipe_json = recipe_json
        self.extra_state = extra_state
        self.log = log
        self.saved_at: tuple[int, int] | None = None  # (epoch, batch) of the newest save
        self.save_seconds: list[float] = []  # what saves take, for a time budget's plan

    def planned(self, max_epoch: int) -> None:
        self.max_epoch = max_epoch  # the last epoch always saves

    def mean_save_seconds(self) -> float | None:
        recent = self.save_seconds[-3:]
        return sum(recent) / len(recent) if recent else None

    def save(self, state: TrainState) -> Path:
        """Collective. A checkpoint of exactly where ``state`` is (mid-epoch when batch_in_epoch > 0)."""
        mid = state.batch_in_epoch > 0
        name = checkpoint_name(state.epoch, state.global_step, mid_epoch=mid)
        if self.saved_at == (state.epoch, state.batch_in_epoch):
            return self.checkpointer.root / name
        t0 = time.perf_counter()
        path = self.checkpointer.save(name, state.to_dict(**self.extra_state()), recipe=self.recipe_json)
        self.save_seconds.append(time.perf_counter() - t0)
        self.saved_at = (state.epoch, state.batch_in_epoch)
        self.log.info(f"checkpoint: {path}")
        return path

    def mark(self, state: TrainState, **fields: Any) -> None:
        """Record ``fields`` in the checkpoint of where ``state`` is, if one was saved there: the epoch-end
        hooks finished (``epoch_hooks_done``), the run finished (``finished``: its final weights are written)."""
        mid = state.batch_in_epoch > 0
        self.checkpointer.update(checkpoint_name(state.epoch, state.global_step, mid_epoch=mid), fields)

    def after_step(self, state: TrainState) -> None:
        every = self.cfg.checkpoint_every_steps
        # the epoch's last batch is followed by the epoch-end checkpoint decision instead
        if every and state.global_step % every == 0 and state.batch_in_epoch < self.batches_per_epoch:
            self.save(state)

    def after_epoch(self, state: TrainState) -> None:
        periodic = self.cfg.checkpoint_freq > 0 and state.epoch % self.cfg.checkpoint_freq == 0
        may_be_best = self.cfg.save_best and self.eval_due(state.epoch)
        if periodic or may_be_best or state.epoch >= self.max_epoch:
            self.save(state)


class BestCheckpointHook(Hook):
    """After an evaluation (runs after ``EvalHook``): records its outcome in the epoch's checkpoint and points
    ``best`` at it when it is the best so far."""

    def __init__(self, checkpointer: Checkpointer, save_best: bool, eval_due: Callable[[int], bool]) -> None:
        self.checkpointer = checkpointer
        self.save_best = save_best
        self.eval_due = eval_due

    def after_epoch(self, state: TrainState) -> None:
        if not self.eval_due(state.epoch):
            return
        fields = {"best_metric": state.best_metric, "best_epoch": state.best_epoch, "last_metric": state.last_metric}
        self.checkpointer.update(checkpoint_name(state.epoch), fields,
                                 is_best=self.save_best and state.last_is_best)


class EmaHook(Hook):
    """The exponential moving average of the weights (``[train.ema]``), updated after every optimizer step
    that was taken. Each process keeps its own; they stay identical because DDP keeps the weights identical."""

    def __init__(self, ema: Any, accelerator: Accelerator, model: nn.Module) -> None:
        self.ema = ema
        self.accelerator = accelerator
        self.model = model

    def after_step(self, state: TrainState) -> None:
        self.ema.update(self.accelerator.unwrap_model(self.model))


class FinalWeightsHook(Hook):
    """``model.safetensors`` in the run dir at the end: the final weights for ``predict`` and other tools."""

    def __init__(self, accelerator: Accelerator, model: nn.Module, run_dir: Path) -> None:
        self.accelerator = accelerator
        self.model = model
        self.run_dir = run_dir

    def after_train(self, state: TrainState) -> None:
        # into a temp dir, then renamed over the old file: a reader never sees half a model.safetensors
        acc, tmp = self.accelerator, self.run_dir / ".final.tmp"
        acc.wait_for_everyone()
        acc.save_model(self.model, str(tmp), safe_serialization=True)
        # every process lists tmp inside save_model (only the main one writes): all must be past it before the
        # main process empties and removes it
        acc.wait_for_everyone()
        if acc.is_main_process:
            for file in tmp.iterdir():  # model.safetensors (or its shards and index, for a huge model)
                os.replace(file, self.run_dir / file.name)
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
