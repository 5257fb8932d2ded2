"""``setup(recipe) -> Run``: build a training run's parts from the recipe, one small builder per part (as
torchtune's recipes do), so that ``trainer.train`` only loops.

Order matters and is explained where it does: the run dir and its lock first (a second launch must stop
before it touches anything), then the resume point and its checks (a refused or finished resume must leave
the run dir as it was), data and model, ``accelerator.prepare``, the schedule, the checkpoint's state, and
only then the files that describe the run (recipe.json, env.json) and the trackers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

from accel_det.config import Recipe
from accel_det.data import DetectionDataset, build_dataset, build_loaders
from accel_det.engine.checkpoint import (
    Checkpointer,
    check_same_model,
    read_checkpoint_recipe,
    read_trainer_state,
    resolve_checkpoint,
)
from accel_det.engine.distributed import (
    build_accelerator,
    check_trackers,
    environment,
    lock_run_dir,
    write_json_atomic,
)
from accel_det.engine.evaluator import Evaluator
from accel_det.engine.hooks import CheckpointHook, EvalHook, FinalWeightsHook, Hook, TrainState
from accel_det.engine.progress import RunLog
from accel_det.errors import CheckpointError, DataError
from accel_det.models import build_model
from accel_det.optim import build_optimizer, build_scheduler, jump_to_step


@dataclass
class Run:
    """Everything the loop needs, built by :func:`setup`."""

    recipe: Recipe
    accelerator: Accelerator
    run_dir: Path
    log: RunLog
    model: nn.Module  # prepared (DDP-wrapped with several processes)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    train_loader: Any
    val_loader: Any
    state: TrainState
    steps_per_epoch: int
    eval_due: Callable[[int], bool]  # epoch (1-based, completed) -> does an evaluation follow it
    hooks: list[Hook] = field(default_factory=list)
    lock: Any = None

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def close(self, success: bool) -> None:
        """End the trackers and release the run-dir lock; after a success also tear the process group down
        (after a failure the other processes may still sit in a collective: leave that to the launcher)."""
        if success:
            self.accelerator.end_training()
        else:
            for tracker in self.accelerator.trackers:
                tracker.finish()
        if self.lock is not None:
            self.lock.close()
            self.lock = None


@dataclass
class ResumePoint:
    path: Path
    trainer_state: dict[str, Any]

    @property
    def epoch(self) -> int:
        return int(self.trainer_state["epoch"])


def setup(recipe: Recipe, hooks: Sequence[Hook] = ()) -> Run | None:
    """Build the run; ``None`` when the run dir holds a finished run (nothing is written then)."""
    check_trackers(recipe.log.trackers)
    run_dir = recipe.run_dir()
    accelerator = build_accelerator(recipe, run_dir, trackers=recipe.log.trackers)
    lock = lock_run_dir(accelerator, run_dir)
    try:
        return _setup(recipe, accelerator, run_dir, lock, hooks)
    except BaseException:
        if lock is not None:
            lock.close()
        raise


def _setup(recipe: Recipe, accelerator: Accelerator, run_dir: Path, lock: Any, hooks: Sequence[Hook]) -> Run | None:
    log = RunLog(accelerator, run_dir)
    resume = _setup_resume_point(recipe, run_dir)
    if resume is not None and resume.epoch >= recipe.train.max_epoch:
        _say_finished(accelerator, run_dir, resume, recipe.train.max_epoch)
        if lock is not None:
            lock.close()
        return None

    set_seed(recipe.train.seed)
    train_set, val_set = _setup_data(recipe, accelerator, log)
    train_loader, val_loader = build_loaders(recipe, train_set, val_set, seed=recipe.train.seed)
    model = _setup_model(recipe, log)
    optimizer = build_optimizer(model, recipe.optimizer)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    if len(train_loader) == 0:
        raise DataError(
            f"{Path(recipe.data.root) / recipe.data.train}: {len(train_set)} training images make no full batch "
            f"of data.batch_size = {recipe.data.batch_size} per process x {accelerator.num_processes} "
            "process(es); lower data.batch_size"
        )
    # Same seed everywhere up to here (same init, same shuffle via data_seed); from now on each process draws
    # its own augmentations (num_workers=0 uses these RNGs; workers mix in the rank in seed_worker).
    set_seed(recipe.train.seed, device_specific=True)
    steps_per_epoch = math.ceil(len(train_loader) / recipe.train.accumulation_freq)
    # Not passed to prepare(): its wrapper would step num_processes times per optimizer step. Not saved in
    # checkpoints either: the LR is a pure function of global_step, rebuilt from the recipe on resume.
    scheduler = build_scheduler(optimizer, recipe.scheduler, steps_per_epoch, recipe.train.max_epoch)
    checkpointer = Checkpointer(accelerator, run_dir, recipe.output.keep_last)
    state = TrainState()
    if resume is not None:
        _resume(checkpointer, resume, state, steps_per_epoch, scheduler, log)
    # written only now: a resume that fails (another model, a corrupt checkpoint) must not replace the
    # recipe of the run it refused to touch
    if accelerator.is_main_process:
        write_json_atomic(run_dir / "recipe.json", recipe.model_dump(mode="json"))
        write_json_atomic(run_dir / "env.json", environment(accelerator, recipe))
    _setup_trackers(accelerator, recipe)

    effective = recipe.data.batch_size * accelerator.num_processes * recipe.train.accumulation_freq
    log.info(
        f"run dir {run_dir} | {recipe.model.name} | {len(train_set)} train / {len(val_set)} val images | "
        f"{accelerator.num_processes} process(es) on {accelerator.device}, "
        f"mixed precision {accelerator.mixed_precision} | batch {recipe.data.batch_size}/process, "
        f"effective {effective} | {steps_per_epoch} optimizer steps/epoch"
    )
    run = Run(recipe, accelerator, run_dir, log, model, optimizer, scheduler, train_loader, val_loader, state,
              steps_per_epoch, eval_due=lambda epoch: False, lock=lock)
    eval_hook = EvalHook(Evaluator(model, val_loader, accelerator, recipe, val_set.category_ids), recipe.eval,
                         recipe.train.max_epoch, run_dir, log)
    run.eval_due = eval_hook.due
    extra_state = {"num_processes": accelerator.num_processes, "steps_per_epoch": steps_per_epoch}
    run.hooks = [
        eval_hook,
        CheckpointHook(checkpointer, recipe.output, recipe.train.max_epoch, recipe.model_dump(mode="json"),
                       lambda: {"lr": run.lr(), **extra_state}, log),
        FinalWeightsHook(accelerator, model, run_dir),
        *hooks,
    ]
    return run


def _setup_resume_point(recipe: Recipe, run_dir: Path) -> ResumePoint | None:
    """The checkpoint to continue from (``output.resume``), after checking it holds this recipe's model."""
    spec = recipe.output.resume
    if spec == "never":
        if (run_dir / "checkpoints" / "last").exists():
            raise CheckpointError(
                f"{run_dir}: already holds checkpoints and output.resume = 'never'; use another "
                "mission.round (or output.resume = 'auto' to continue) so nothing is overwritten"
            )
        return None
    path = resolve_checkpoint(run_dir, "auto" if spec == "auto" else spec)
    if path is None:
        return None
    # checkpoints from before they held their own recipe: the run's
    saved_recipe = read_checkpoint_recipe(path) or read_checkpoint_recipe(run_dir)
    check_same_model(path, saved_recipe, recipe)
    return ResumePoint(path, read_trainer_state(path))


def _say_finished(accelerator: Accelerator, run_dir: Path, resume: ResumePoint, max_epoch: int) -> None:
    if resume.epoch > max_epoch:
        accelerator.print(f"warning: train.max_epoch = {max_epoch} is lower than the epoch of the run's last "
                          f"checkpoint ({resume.epoch})")
    accelerator.print(f"{run_dir}: finished (last checkpoint {resume.path.name}, train.max_epoch = {max_epoch}); "
                      "nothing to train and nothing changed. Raise train.max_epoch to continue it, or set "
                      "mission.round for a new run")


def _count(ds: DetectionDataset) -> str:
    return f"{len(ds)} images / {ds.num_objects()} objects"


def _setup_data(recipe: Recipe, accelerator: Accelerator, log: RunLog) -> tuple[DetectionDataset, DetectionDataset]:
    # the main process generates/indexes data first (synthetic data is written once, not N times)
    with accelerator.main_process_first():
        train_set, val_set = build_dataset(recipe, "train"), build_dataset(recipe, "val")
    data = recipe.data
    log.info(f"data: train {_count(train_set)}, val {_count(val_set)}")
    for message in (*getattr(train_set, "warnings", ()), *getattr(val_set, "warnings", ())):
        log.info(f"warning: {message}")
    if train_set.num_objects() == 0:
        raise DataError(f"{Path(data.root) / data.train}: the training split has no objects to learn from "
                        f"(data.train; {len(train_set)} images, check the annotation files or folder names)")
    if val_set.num_objects() == 0:
        log.info(f"warning: {Path(data.root) / data.val}: the val split has no objects: no mAP can be computed")
    return train_set, val_set


def _setup_model(recipe: Recipe, log: RunLog) -> nn.Module:
    model, load_report = build_model(recipe)
    if load_report is not None:
        log.info(f"weights: {load_report.summary()}")
    return model


def _resume(checkpointer: Checkpointer, resume: ResumePoint, state: TrainState, steps_per_epoch: int,
            scheduler: Any, log: RunLog) -> None:
    saved = checkpointer.load(resume.path)
    state.epoch, state.global_step = int(saved["epoch"]), int(saved["global_step"])
    if saved.get("steps_per_epoch") not in (None, steps_per_epoch):
        # Another process count, batch size or accumulation: the schedule is defined in epochs, and the
        # checkpoint sits at an epoch end, so re-express the position in the new epoch length.
        log.info(f"note: epochs had {saved['steps_per_epoch']} optimizer steps, now {steps_per_epoch}; "
                 f"continuing the schedule at epoch {state.epoch}")
        state.global_step = state.epoch * steps_per_epoch
    state.best_metric, state.best_epoch = saved.get("best_metric"), saved.get("best_epoch")
    jump_to_step(scheduler, state.global_step)
    log.info(f"resumed from {resume.path} (epoch {state.epoch}, step {state.global_step})")
    # metrics.jsonl may hold events past this checkpoint (a run killed mid-epoch): mark where we resumed
    log.event({"event": "resume", "epoch": state.epoch, "step": state.global_step, "from": str(resume.path)})


def _flat_config(recipe: Recipe) -> dict[str, Any]:
    # trackers (tensorboard hparams) take flat scalars only
    out: dict[str, Any] = {}

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[prefix + k] = v if isinstance(v, int | float | str | bool) else str(v)

    walk(recipe.model_dump(mode="json"), "")
    return out


def _setup_trackers(accelerator: Accelerator, recipe: Recipe) -> None:
    if not recipe.log.trackers:
        return
    # The mission is the tracker's project (W&B, MLflow experiment; tensorboard/<mission>/ in the run dir)
    # and the run is named after the mission and round, so rounds sit side by side in one project.
    name = f"{recipe.mission.name}-round{recipe.mission.round}"
    accelerator.init_trackers(recipe.mission.name, config=_flat_config(recipe),
                              init_kwargs={"wandb": {"name": name}, "mlflow": {"run_name": name}})
