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
from accel_det.data import DetectionDataset, build_dataset, build_train_loader, build_val_loader
from accel_det.data.builder import eval_splits
from accel_det.engine.budget import run_length
from accel_det.engine.checkpoint import (
    Checkpointer,
    check_same_model,
    read_checkpoint_recipe,
    read_trainer_state,
    recover_interrupted_save,
    resolve_checkpoint,
)
from accel_det.engine.distributed import (
    build_accelerator,
    check_trackers,
    environment,
    lock_run_dir,
    main_process_first,
)
from accel_det.engine.evaluator import Evaluator
from accel_det.engine.extras import ProfilerHook, build_callbacks
from accel_det.engine.hooks import (
    BestCheckpointHook,
    CheckpointHook,
    EmaHook,
    EvalHook,
    FinalWeightsHook,
    Hook,
    TrainState,
)
from accel_det.engine.model_speed import apply_memory_format, compile_model
from accel_det.engine.progress import RunLog
from accel_det.engine.report_hook import ReportHook
from accel_det.engine.summary import model_summary
from accel_det.errors import CheckpointError, DataError, describe
from accel_det.jsonio import write_json_atomic
from accel_det.models import build_model
from accel_det.models.sync_bn import convert_sync_bn
from accel_det.optim import ModelEMA, build_optimizer, build_scheduler, jump_to_step


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
    train_set: DetectionDataset
    train_loader: Any
    val_loader: Any
    state: TrainState
    eval_due: Callable[[int], bool]  # epoch (1-based, completed) -> does an evaluation follow it
    hooks: list[Hook] = field(default_factory=list)
    checkpoint: CheckpointHook | None = None  # also saves where a signal stopped the loop
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

    def finished(self, run_dir: Path) -> bool:
        """Whether the run wrote its final weights after this checkpoint (older checkpoints do not say: then
        the final weights file tells)."""
        return bool(self.trainer_state.get("finished", (run_dir / "model.safetensors").is_file()))


def setup(recipe: Recipe, hooks: Sequence[Hook] = ()) -> Run | None:
    """Build the run; ``None`` when the run dir holds a finished run (nothing is written then)."""
    check_trackers(recipe.log.trackers)
    run_dir = recipe.run_dir()
    accelerator = build_accelerator(recipe, run_dir, trackers=recipe.log.trackers)
    lock = lock_run_dir(accelerator, run_dir)
    log = RunLog(accelerator, run_dir)
    try:
        return _setup(recipe, accelerator, run_dir, log, lock, hooks)
    except BaseException as exc:
        log.error(f"could not start: {describe(exc)}", local=getattr(exc, "local", False))
        if lock is not None:
            lock.close()
        raise


def _setup(recipe: Recipe, accelerator: Accelerator, run_dir: Path, log: RunLog, lock: Any,
           hooks: Sequence[Hook]) -> Run | None:
    if accelerator.is_main_process:
        for name in recover_interrupted_save(run_dir / "checkpoints"):
            log.info(f"note: put back checkpoint {name}, left aside by a save that was interrupted")
    accelerator.wait_for_everyone()
    resume = _setup_resume_point(recipe, run_dir)
    length = run_length(recipe, resume.trainer_state) if resume is not None else None  # a budget: as planned
    if resume is not None and length is not None and resume.epoch >= length and resume.finished(run_dir):
        _say_finished(accelerator, run_dir, resume, length, recipe.train.time_budget_minutes is not None)
        if lock is not None:
            lock.close()
        return None

    set_seed(recipe.train.seed)
    train_set, val_sets = _setup_data(recipe, accelerator, log)
    model = _setup_model(recipe, accelerator, log)
    optimizer = build_optimizer(model, recipe.optimizer, bias_group=recipe.scheduler.warmup_bias_lr > 0)
    loaders = [build_train_loader(recipe, train_set), *(build_val_loader(recipe, ds) for ds in val_sets.values())]
    model, optimizer, train_loader, *val_loaders = accelerator.prepare(model, optimizer, *loaders)
    if len(train_loader) == 0:
        raise DataError(
            f"{train_set.source}: {len(train_set)} training images make no full batch of data.batch_size = "
            f"{recipe.data.batch_size} per process x {accelerator.num_processes} process(es); lower data.batch_size"
        )
    # Same seed everywhere up to here: the same initial weights on every process. Augmentations do not use
    # these generators (each sample draws from its own, seeded by seed, epoch and index: data/dataset.py);
    # anything else random after this point differs per process, as DDP expects.
    set_seed(recipe.train.seed, device_specific=True)
    ema = None
    if recipe.train.ema.enabled:
        ema = ModelEMA(accelerator.unwrap_model(model), recipe.train.ema.decay, recipe.train.ema.warmup)
        accelerator.register_for_checkpointing(ema)  # in save_state/load_state from now on, resume included
    steps_per_epoch = math.ceil(len(train_loader) / recipe.train.accumulation_freq)
    # Not passed to prepare(): its wrapper would step num_processes times per optimizer step. Not saved in
    # checkpoints either: the LR is a pure function of the schedule step, rebuilt from the recipe on resume.
    scheduler = build_scheduler(optimizer, recipe.scheduler, steps_per_epoch, recipe.train.max_epoch)
    checkpointer = Checkpointer(accelerator, run_dir, recipe.output.keep_last,
                                ema_module=ema.module if ema is not None else None)
    state = TrainState()
    where_now = {"num_processes": accelerator.num_processes, "batch_size": recipe.data.batch_size,
                 "accumulation_freq": recipe.train.accumulation_freq, "steps_per_epoch": steps_per_epoch}
    if resume is not None:
        _resume(checkpointer, resume, state, where_now, scheduler, log)
    elif (run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").stat().st_size:
        # killed before its first checkpoint: the history so far belongs to a run that starts over
        log.info("restart: this run dir has history but no checkpoint; training starts from scratch")
        log.event({"event": "restart", "epoch": 0, "step": 0})
    extra_hooks = _setup_extra_hooks(recipe, accelerator, run_dir, log, model, optimizer)
    # written only now: a resume that fails (another model, a corrupt checkpoint) must not replace the
    # recipe of the run it refused to touch
    if accelerator.is_main_process:
        write_json_atomic(run_dir / "recipe.json", recipe.model_dump(mode="json"))
        write_json_atomic(run_dir / "env.json", environment(accelerator, recipe))
    _setup_trackers(accelerator, recipe)

    effective = recipe.data.batch_size * accelerator.num_processes * recipe.train.accumulation_freq
    log.info(
        f"run dir {run_dir} | {recipe.model.name} | {len(train_set)} train / "
        f"{' + '.join(str(len(ds)) for ds in val_sets.values())} val images | "
        f"{accelerator.num_processes} process(es) on {accelerator.device}, "
        f"mixed precision {accelerator.mixed_precision} | batch {recipe.data.batch_size}/process, "
        f"effective {effective} | {steps_per_epoch} optimizer steps/epoch"
    )
    log.print_renderable(model_summary(accelerator.unwrap_model(model), optimizer, recipe.model.img_dim))

    # what is evaluated, saved at the end and served: the EMA weights when there are any
    served = ema.module if ema is not None else model
    # plots/ and report.html at the end, from the last evaluation's predictions (it keeps the val evaluator's)
    evaluators = {split: Evaluator(served, loader, accelerator, recipe, ds.category_ids)
                  for (split, ds), loader in zip(val_sets.items(), val_loaders)}
    report = None
    if recipe.output.report:
        report = ReportHook(recipe, accelerator, run_dir, log, train_set, val_sets["val"], ema is not None)
        evaluators = report.watch(evaluators)
    eval_hook = EvalHook(evaluators, recipe.eval, recipe.train.max_epoch, run_dir, log)
    checkpoint = CheckpointHook(checkpointer, recipe.output, recipe.train.max_epoch, len(train_loader),
                                eval_hook.due, recipe.model_dump(mode="json"),
                                lambda: {"lr": float(optimizer.param_groups[0]["lr"]), **where_now}, log)
    if resume is not None:
        checkpoint.saved_at = (state.epoch, state.batch_in_epoch)  # what it resumed from: no second copy
    all_hooks = [
        *([EmaHook(ema, accelerator, model)] if ema is not None else []),  # first: a checkpoint includes it
        checkpoint,  # the epoch's checkpoint is written before its evaluation: a failing one loses nothing
        eval_hook,
        BestCheckpointHook(checkpointer, recipe.output.save_best, eval_hook.due),
        FinalWeightsHook(accelerator, served, run_dir),
        *([report] if report else []),  # after the final weights: a slow or failing figure cannot cost them
        *extra_hooks,
        *hooks,
    ]
    return Run(recipe, accelerator, run_dir, log, model, optimizer, scheduler, train_set, train_loader,
               val_loaders[0], state, eval_hook.due, all_hooks, checkpoint, lock)


def _setup_extra_hooks(recipe: Recipe, accelerator: Accelerator, run_dir: Path, log: RunLog, model: nn.Module,
                       optimizer: Any) -> list[Hook]:
    """What the recipe switches on: the profiler and the user's callbacks (built here, before anything is
    written, so a bad callback is a recipe error that leaves the run dir alone)."""
    hooks: list[Hook] = []
    if recipe.train.profile_steps:
        start, end = recipe.train.profile_steps
        hooks.append(ProfilerHook(start, end, accelerator, run_dir, log))
    context = {"accelerator": accelerator, "model": model, "optimizer": optimizer, "run_dir": run_dir,
               "log": log, "recipe": recipe}
    return [*hooks, *build_callbacks(recipe.train.callbacks, context)]


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


def _say_finished(accelerator: Accelerator, run_dir: Path, resume: ResumePoint, max_epoch: int,
                  budget: bool = False) -> None:
    if budget:  # its LR schedule has ended: more epochs would not continue it
        accelerator.print(f"{run_dir}: finished (last checkpoint {resume.path.name}, {max_epoch} epochs planned for "
                          "train.time_budget_minutes); nothing changed. Set mission.round for a new run")
        return
    if resume.epoch > max_epoch:
        accelerator.print(f"warning: train.max_epoch = {max_epoch} is lower than the epoch of the run's last "
                          f"checkpoint ({resume.epoch})")
    accelerator.print(f"{run_dir}: finished (last checkpoint {resume.path.name}, train.max_epoch = {max_epoch}); "
                      "nothing to train and nothing changed. Raise train.max_epoch to continue it, or set "
                      "mission.round for a new run")


def _count(ds: DetectionDataset) -> str:
    return f"{len(ds)} images / {ds.num_objects()} objects"


def _setup_data(recipe: Recipe, accelerator: Accelerator,
                log: RunLog) -> tuple[DetectionDataset, dict[str, DetectionDataset]]:
    """The training set (both sets, mixed, with ``[data.mix]``) and the val split(s) by name."""
    # the main process generates/indexes data first (synthetic data is written once, not N times)
    splits = eval_splits(recipe)
    built = main_process_first(accelerator, lambda: [build_dataset(recipe, s) for s in ("train", *splits)])
    train_set, val_sets = built[0], dict(zip(splits, built[1:]))
    log.info("data: " + ", ".join(f"{name} {_count(ds)}" for name, ds in (("train", train_set), *val_sets.items())))
    for ds in (train_set, *val_sets.values()):
        for message in ds.warnings:
            log.info(f"warning: {message}")
    if train_set.num_objects() == 0:
        raise DataError(f"{train_set.source}: the training split has no objects to learn from (data.train; "
                        f"{len(train_set)} images, check the annotation files or folder names)")
    for name, ds in val_sets.items():
        if ds.num_objects() == 0:
            log.info(f"warning: {ds.source}: the {name} split has no objects: no mAP can be computed")
    return train_set, val_sets


def _setup_model(recipe: Recipe, accelerator: Accelerator, log: RunLog) -> nn.Module:
    model, load_report = build_model(recipe)
    if load_report is not None:
        log.info(f"weights: {load_report.summary()}")
    if recipe.model.sync_bn:
        model, note = convert_sync_bn(model, accelerator.num_processes, accelerator.device)
        log.info(f"note: {note}")
    model = apply_memory_format(model, recipe)
    compile_model(model.to(accelerator.device), recipe, log)
    return model


def _resume(checkpointer: Checkpointer, resume: ResumePoint, state: TrainState, now: dict[str, int],
            scheduler: Any, log: RunLog) -> None:
    saved = checkpointer.load(resume.path)
    moved = checkpointer.rewind(resume.path, saved.get("best_epoch"))
    if moved:
        log.info(f"note: resuming from {resume.path.name}, an older checkpoint than {', '.join(moved)}: those "
                 f"were moved to {checkpointer.root}/.abandoned-*/ and 'best' follows the resumed history")
    state.epoch, state.global_step = int(saved["epoch"]), int(saved["global_step"])
    state.schedule_step = int(saved.get("schedule_step", state.global_step))
    state.batch_in_epoch = int(saved.get("batch_in_epoch", 0))
    state.epoch_loss_sums = dict(saved.get("epoch_loss_sums") or {})
    state.epoch_loss_count = int(saved.get("epoch_loss_count", 0))
    state.best_metric, state.best_epoch = saved.get("best_metric"), saved.get("best_epoch")
    state.last_metric = saved.get("last_metric")
    state.nonfinite_streak = int(saved.get("nonfinite_streak", 0))
    # stopped among its epoch-end hooks (an evaluation, the final weights): train() runs them again
    state.epoch_hooks_done = bool(saved.get("epoch_hooks_done", True))
    state.window_loss_sums = dict(saved.get("window_loss_sums") or {})
    state.window_loss_count = int(saved.get("window_loss_count", 0))
    state.budget = saved.get("budget")  # a time budget's plan: train() keeps it (engine/budget.py)
    changed = [k for k, v in now.items() if saved.get(k, v) != v]
    if changed:
        # Another process count, batch size or accumulation. The schedule is defined in epochs: re-express the
        # position in the new epoch length (global_step, the count of steps taken, goes on as it was). Batches
        # of a mid-epoch checkpoint are batches of the old layout: that epoch starts again from its start.
        olds = ", ".join(f"{k} {saved[k]} -> {now[k]}" for k in changed)
        again = f"; epoch {state.epoch + 1} restarts from its first batch" if state.batch_in_epoch else ""
        log.info(f"note: {olds}: continuing the schedule at epoch {state.epoch}{again}")
        state.batch_in_epoch, state.epoch_loss_sums, state.epoch_loss_count = 0, {}, 0
        state.window_loss_sums, state.window_loss_count = {}, 0
        state.schedule_step = state.epoch * now["steps_per_epoch"]
    jump_to_step(scheduler, state.schedule_step)
    at = f"epoch {state.epoch}" + (f" + {state.batch_in_epoch} batches" if state.batch_in_epoch else "")
    log.info(f"resumed from {resume.path} ({at}, step {state.global_step})")
    # metrics.jsonl may hold events past this checkpoint (a run killed mid-epoch): mark where we resumed
    log.event({"event": "resume", "epoch": state.epoch, "batch": state.batch_in_epoch, "step": state.global_step,
               "from": str(resume.path)})


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
