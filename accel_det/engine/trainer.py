"""THE training loop: ``train`` (epochs) -> ``train_one_epoch`` (batches) -> ``train_step`` (one micro-batch).

``setup`` (engine/setup.py) builds the parts; this file only loops and calls the hooks. Every process runs
this same control flow; only file writes and printing are main-process-only (RunLog, hooks). The LR
schedule counts optimizer steps of one process (optim/scheduler.py). docs/architecture.md has the picture.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn

from accel_det.config import Recipe
from accel_det.engine.budget import TimeBudget
from accel_det.engine.evaluator import to_float_images
from accel_det.engine.hooks import FinalWeightsHook, Hook, TrainState
from accel_det.engine.preempt import StopRequest, terminate_raises
from accel_det.engine.progress import LossMeter, RunClock, TrainProgress, log_stage, report_replaced
from accel_det.engine.setup import Run, setup
from accel_det.errors import TrainingError, describe
from accel_det.optim import current_momentum, group_lrs


def run_training(recipe: Recipe, hooks: Sequence[Hook] = ()) -> TrainState | None:
    """Set up and train; ``None`` when the run dir already holds a finished run."""
    with terminate_raises():
        run = setup(recipe, hooks)
    return None if run is None else train(run)


def train(run: Run) -> TrainState:
    recipe, state, log = run.recipe, run.state, run.log
    first_epoch = state.epoch
    clock = RunClock(recipe.train.max_epoch, len(run.train_loader), run.eval_due, len(run.val_loader))
    progress = TrainProgress(log, clock, recipe.train.log_freq)
    budget: TimeBudget | None = None
    success, where = False, "at the start"
    try:
        # train.time_budget_minutes: the epochs are planned, and re-planned, while training (engine/budget.py)
        if recipe.train.time_budget_minutes is not None:
            budget = TimeBudget(run, clock, progress)
        for hook in run.hooks:
            hook.planned(_length(run, budget))
        where = f"in epoch {state.epoch + 1}/{_length(run, budget)}"
        with StopRequest(run.accelerator) as stop:
            for hook in run.hooks:
                hook.before_train(state)
            if not state.epoch_hooks_done:  # resumed from an epoch's checkpoint whose evaluation never finished
                where = f"after epoch {state.epoch}/{_length(run, budget)} (evaluation, checkpoint)"
                _after_epoch(run)
            run.model.train()
            with progress:
                while state.epoch < _length(run, budget):
                    epoch = state.epoch
                    if budget is not None:
                        progress.close_gap(epoch)  # the previous epoch's evaluation and checkpoint, timed
                        budget.before_epoch()
                    max_epoch = _length(run, budget)
                    run.train_set.set_epoch(epoch)  # augmentations draw from (seed, epoch, sample index)
                    run.train_loader.set_epoch(epoch)  # the shuffle
                    where = f"in epoch {epoch + 1}/{max_epoch}"
                    log_stage(log, recipe.data, epoch, first=epoch == first_epoch,
                              starts=budget.stage_starts if budget is not None else None)
                    progress.start_epoch(epoch, state.batch_in_epoch)
                    t0 = time.perf_counter()
                    img_per_s, skipped, stopped = train_one_epoch(run, epoch, progress, stop, budget)
                    max_epoch = _length(run, budget)  # the first plan may come inside the first epoch
                    if stopped:
                        raise stop.stopped(str(run.checkpoint.save(state)))
                    seconds = time.perf_counter() - t0
                    means = {k: v / max(state.epoch_loss_count, 1) for k, v in state.epoch_loss_sums.items()}
                    state.epoch, state.batch_in_epoch = epoch + 1, 0
                    state.epoch_loss_sums, state.epoch_loss_count = {}, 0
                    progress.end_epoch(epoch, means, run.lr(), img_per_s, seconds)
                    log.event({"event": "epoch", "epoch": state.epoch, "step": state.global_step,
                               "seconds": round(seconds, 3), "lr": run.lr(), **means,
                               "img_per_s": round(img_per_s, 2), "skipped_steps": skipped})
                    where = f"after epoch {state.epoch}/{max_epoch} (evaluation, checkpoint)"
                    _after_epoch(run)
                    # after the last epoch there is only the final weights left to write: finish instead
                    if stop.should_stop() and state.epoch < max_epoch:
                        raise stop.stopped(str(run.checkpoint.save(state)))
            where = "at the end (final weights)"
            for hook in run.hooks:
                hook.after_train(state)
                if budget is not None and isinstance(hook, FinalWeightsHook):
                    budget.weights_written()  # the budget ends here; the report is drawn after it
            run.checkpoint.mark(state, finished=True)
            if budget is not None:
                budget.finish()
        success = True
    except BaseException as exc:
        # stderr gets the error from the CLI wrapper; the run dir must say why and where the run stopped
        log.error(f"stopped {where}, at optimizer step {state.global_step}: {describe(exc)}",
                  local=getattr(exc, "local", False))
        raise
    finally:
        run.close(success)
    if state.best_metric is not None:
        log.info(f"best {recipe.eval.metric} {state.best_metric:.4f} at epoch {state.best_epoch}")
    log.info(f"done: {run.run_dir}")
    return state


def _length(run: Run, budget: TimeBudget | None) -> int:
    """The run's epochs: train.max_epoch, or what the time budget plans now."""
    return budget.epochs if budget is not None else run.recipe.train.max_epoch


def _after_epoch(run: Run) -> None:
    """The epoch-end hooks (checkpoint, evaluation, best, ...). The epoch's checkpoint records that they have
    not finished until they have: a run stopped among them runs them again when resumed."""
    run.state.epoch_hooks_done = False
    for hook in run.hooks:
        hook.after_epoch(run.state)
    run.state.epoch_hooks_done = True
    run.checkpoint.mark(run.state, epoch_hooks_done=True)


def train_one_epoch(run: Run, epoch: int, progress: TrainProgress, stop: StopRequest,
                    budget: TimeBudget | None = None) -> tuple[float, int, bool]:
    """One pass over the train loader, from ``state.batch_in_epoch`` (a mid-epoch resume skips the batches
    already trained on, without loading them). Returns (img/s, steps skipped for non-finite values, whether
    a signal stopped it mid-epoch). ``budget``: a time budget makes its first plan after a few steps."""
    acc, state, recipe = run.accelerator, run.state, run.recipe
    n_batches, accum, log_freq = len(run.train_loader), recipe.train.accumulation_freq, recipe.train.log_freq
    every = recipe.output.checkpoint_every_steps
    start = state.batch_in_epoch
    loader = acc.skip_first_batches(run.train_loader, start) if start else run.train_loader
    # An epoch whose batches are not a multiple of accumulation_freq ends in a short window of `tail`
    # micro-batches. accelerator.backward divides every loss by accumulation_freq, so that last step would
    # average over accumulation_freq batches it did not see: scale its losses to average over the real count
    # (what torchtune does by counting tokens).
    tail = n_batches % accum
    meter = LossMeter(state)
    window: list[tuple[dict[str, torch.Tensor], list[dict[str, Any]]]] = []  # this optimizer step's micro-batches
    replaced: list[str] = []
    skipped_steps = images_seen = window_images = 0  # images: over all processes
    t_window = t_epoch = time.perf_counter()

    def log_line(i: int) -> None:
        nonlocal t_window, window_images
        means = meter.reduce(acc)
        now = time.perf_counter()
        img_per_s = window_images / max(now - t_window, 1e-9)
        progress.update(epoch, i, means, run.lr(), img_per_s)
        run.log.event({"event": "train", "epoch": epoch + 1, "batch": i + 1, "step": state.global_step,
                       **_optimizer_numbers(run.optimizer), **means, "img_per_s": round(img_per_s, 2)})
        t_window, window_images = now, 0

    for i, (images, targets) in enumerate(loader, start=start):
        weight = accum / tail if tail and i >= n_batches - tail else 1.0
        losses, skipped = train_step(acc, run.model, run.optimizer, run.scheduler, images, targets,
                                     clip_grad_norm=recipe.train.clip_grad_norm, loss_weight=weight)
        replaced += [m for t in targets for m in t.get("replaced", ())]
        window.append((losses, targets))
        images_seen += images.shape[0] * acc.num_processes
        window_images += images.shape[0] * acc.num_processes
        progress.advance(i)
        if not acc.sync_gradients:
            continue
        # the optimizer step (or its skip) closes the window: only then do its losses count
        state.global_step += 1
        state.schedule_step += 1
        state.batch_in_epoch = i + 1
        if skipped:
            skipped_steps += 1
            _skipped(run, epoch, i, skipped, window)
        else:
            state.nonfinite_streak = 0
            for step_losses, _ in window:
                meter.add(step_losses)
        window = []
        # a log line also where a checkpoint is due: a run resumed from it then logs the same windows
        if meter.count >= log_freq or i + 1 == n_batches or (every and state.global_step % every == 0):
            log_line(i)
            stop.sync()
        if budget is not None:
            budget.after_step()
        if not skipped:  # a skipped step changed nothing: no checkpoint of it, no EMA update
            for hook in run.hooks:
                hook.after_step(state)
        if i + 1 < n_batches and stop.should_stop():
            meter.park(acc)  # the losses since the last log line go into the checkpoint
            return images_seen / max(time.perf_counter() - t_epoch, 1e-9), skipped_steps, True
    report_replaced(run.log, run.accelerator, epoch, replaced)
    if skipped_steps:
        run.log.info(f"warning: epoch {epoch + 1}: {skipped_steps} step(s) skipped for non-finite values")
    return images_seen / max(time.perf_counter() - t_epoch, 1e-9), skipped_steps, False


def _optimizer_numbers(optimizer: Any) -> dict[str, float]:
    """What the log shows of the optimizer: the LR, momentum (it ramps during warmup) and the bias LR (with
    scheduler.warmup_bias_lr, its own ramp)."""
    out = {"lr": float(optimizer.param_groups[0]["lr"])}
    momentum = current_momentum(optimizer)
    if momentum is not None:
        out["momentum"] = momentum
    lrs = group_lrs(optimizer)
    if "bias" in lrs:
        out["lr_bias"] = lrs["bias"]
    return out


def _skipped(run: Run, epoch: int, batch: int, why: str,
             window: list[tuple[dict[str, torch.Tensor], list[dict[str, Any]]]]) -> None:
    """Collective (the skip is the same on every process): log a skipped step with the image files of the
    micro-batches whose loss was not finite, from whichever process had them; stop after train.max_nonfinite
    in a row (the newest checkpoint is then from before them)."""
    state = run.state
    state.nonfinite_streak += 1
    # a NaN loss on one process becomes NaN gradients on all after the all-reduce: find whose loss it was
    # (reading the losses syncs with the device, but only on this rare path)
    mine = [str(t.get("file", t["image_id"])) for losses, targets in window
            if not torch.isfinite(losses["loss"]) for t in targets]
    files = [f for part in gather_object([mine]) for f in part] if run.accelerator.num_processes > 1 else mine
    what = {"non_finite": "non-finite loss or gradients",
            "overflow": "fp16 overflow (the grad scaler lowers its scale)"}[why]
    run.log.info(f"warning: epoch {epoch + 1} batch {batch + 1}: {what}, step skipped"
                 + (f"; non-finite loss on {', '.join(files)}" if files else ""))
    run.log.event({"event": "skipped_step", "epoch": epoch + 1, "batch": batch + 1, "step": state.global_step,
                   "why": why, "files": files})
    limit = run.recipe.train.max_nonfinite
    if why != "overflow" and state.nonfinite_streak >= limit:
        raise TrainingError(
            f"{state.nonfinite_streak} steps in a row had non-finite values (train.max_nonfinite = {limit}), "
            f"the last at epoch {epoch + 1}, batch {batch + 1}: lower optimizer.lr, raise scheduler.warmup_iters "
            "or set train.clip_grad_norm; the newest checkpoint is from before"
        )


def train_step(
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    images: torch.Tensor,
    targets: list[dict[str, Any]],
    *,
    clip_grad_norm: float = 0.0,
    loss_weight: float = 1.0,
) -> tuple[dict[str, torch.Tensor], str | None]:
    """One micro-batch: forward, backward and, when the accumulation window closes, clip, optimizer and
    scheduler step. Returns the detached losses (``loss`` = their sum) and, at the window's close, why the
    optimizer step was skipped if it was: "non_finite" (the all-reduced gradients are not finite — a NaN
    loss on any process makes them NaN on every process, so all skip together without another collective)
    or "overflow" (fp16: the grad scaler's own skip, counted, not fought). A non-finite micro-batch thus
    drops its whole accumulation window."""
    skipped = None
    with accelerator.accumulate(model):
        losses = model(to_float_images(images), targets)
        loss = sum(losses.values())
        accelerator.backward(loss * loss_weight if loss_weight != 1.0 else loss)
        if accelerator.sync_gradients:
            if accelerator.scaler is None:
                # one host sync per optimizer step: the norm (clip with max_norm = inf only measures it)
                norm = accelerator.clip_grad_norm_(model.parameters(), clip_grad_norm or float("inf"))
                if not bool(torch.isfinite(norm)):
                    skipped = "non_finite"
            elif clip_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), clip_grad_norm)
        if skipped is None:
            # a no-op inside the accumulation window (accelerate's optimizer wrapper checks sync_gradients)
            optimizer.step()
            if accelerator.sync_gradients and accelerator.optimizer_step_was_skipped:
                skipped = "overflow"
        optimizer.zero_grad(set_to_none=True)
    if accelerator.sync_gradients:
        scheduler.step()  # the schedule counts step positions, skipped or not
    return {"loss": loss.detach(), **{k: v.detach() for k, v in losses.items()}}, skipped
