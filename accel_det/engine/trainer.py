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
from accel_det.engine.evaluator import to_float_images
from accel_det.engine.hooks import Hook, TrainState
from accel_det.engine.preempt import StopRequest, terminate_raises
from accel_det.engine.progress import RunClock, TrainProgress
from accel_det.engine.setup import Run, setup
from accel_det.errors import TrainingError, describe
from accel_det.optim import current_momentum


def run_training(recipe: Recipe, hooks: Sequence[Hook] = ()) -> TrainState | None:
    """Set up and train; ``None`` when the run dir already holds a finished run."""
    with terminate_raises():
        run = setup(recipe, hooks)
    return None if run is None else train(run)


def train(run: Run) -> TrainState:
    recipe, state, log = run.recipe, run.state, run.log
    max_epoch = recipe.train.max_epoch
    clock = RunClock(max_epoch, len(run.train_loader), run.eval_due, len(run.val_loader))
    success, where = False, f"in epoch {state.epoch + 1}/{max_epoch}"
    try:
        with StopRequest(run.accelerator) as stop:
            for hook in run.hooks:
                hook.before_train(state)
            run.model.train()
            with TrainProgress(log, clock, recipe.train.log_freq) as progress:
                for epoch in range(state.epoch, max_epoch):
                    run.train_set.set_epoch(epoch)  # augmentations draw from (seed, epoch, sample index)
                    run.train_loader.set_epoch(epoch)  # the shuffle
                    where = f"in epoch {epoch + 1}/{max_epoch}"
                    _log_stage(run, epoch)
                    progress.start_epoch(epoch, state.batch_in_epoch)
                    t0 = time.perf_counter()
                    img_per_s, stopped = train_one_epoch(run, epoch, progress, stop)
                    if stopped:
                        raise stop.stopped(str(run.checkpoint.save(state)))
                    seconds = time.perf_counter() - t0
                    means = {k: v / max(state.epoch_loss_count, 1) for k, v in state.epoch_loss_sums.items()}
                    state.epoch, state.batch_in_epoch = epoch + 1, 0
                    state.epoch_loss_sums, state.epoch_loss_count = {}, 0
                    progress.end_epoch(epoch, means, run.lr(), img_per_s, seconds)
                    log.event({"event": "epoch", "epoch": state.epoch, "step": state.global_step,
                               "seconds": round(seconds, 3), "lr": run.lr(), **means,
                               "img_per_s": round(img_per_s, 2)})
                    where = f"after epoch {state.epoch}/{max_epoch} (evaluation, checkpoint)"
                    for hook in run.hooks:
                        hook.after_epoch(state)
                    if stop.should_stop():
                        raise stop.stopped(str(run.checkpoint.save(state)))
            for hook in run.hooks:
                hook.after_train(state)
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


class LossMeter:
    """Sums of the losses on the device since the last log line: no host sync per batch, one ``reduce`` (a
    collective, reached by every process at the same batch index) per log line. The reduced values also
    accumulate in the ``TrainState``, so the epoch's mean survives a mid-epoch checkpoint."""

    def __init__(self, state: TrainState) -> None:
        self.state = state
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums[k] + v.float() if k in self.sums else v.float()
        self.count += 1

    def reduce(self, accelerator: Accelerator) -> dict[str, float]:
        means = {k: float(accelerator.reduce(v / self.count, "mean")) for k, v in self.sums.items()}
        sums = self.state.epoch_loss_sums
        for k, v in means.items():
            sums[k] = sums.get(k, 0.0) + v * self.count
        self.state.epoch_loss_count += self.count
        self.sums, self.count = {}, 0
        return means


def train_one_epoch(run: Run, epoch: int, progress: TrainProgress, stop: StopRequest) -> tuple[float, bool]:
    """One pass over the train loader, from ``state.batch_in_epoch`` (a mid-epoch resume skips the batches
    already trained on, without loading them). Returns (img/s, whether a signal stopped it mid-epoch)."""
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
    replaced: list[str] = []
    skips: list[str] = []
    images_seen = window_images = 0  # over all processes
    t_window = t_epoch = time.perf_counter()
    for i, (images, targets) in enumerate(loader, start=start):
        weight = accum / tail if tail and i >= n_batches - tail else 1.0
        losses, skipped = train_step(acc, run.model, run.optimizer, run.scheduler, images, targets,
                                     clip_grad_norm=recipe.train.clip_grad_norm, loss_weight=weight)
        replaced += [m for t in targets for m in t.get("replaced", ())]
        if skipped:
            skips.append(_skipped(run, epoch, i, skipped, targets))
        else:
            state.nonfinite_streak = 0
            meter.add(losses)
        images_seen += images.shape[0] * acc.num_processes
        window_images += images.shape[0] * acc.num_processes
        progress.advance(i)
        stepped = acc.sync_gradients
        if stepped:
            state.global_step += 1
            state.schedule_step += 1
            state.batch_in_epoch = i + 1
        # a log line also where a checkpoint is due: a run resumed from it then logs the same windows
        if meter.count == log_freq or i + 1 == n_batches or (stepped and every and state.global_step % every == 0):
            means = meter.reduce(acc)
            stop.sync()
            now = time.perf_counter()
            img_per_s = window_images / max(now - t_window, 1e-9)
            progress.update(epoch, i, means, run.lr(), img_per_s)
            momentum = current_momentum(run.optimizer)  # it ramps up during warmup too
            run.log.event({"event": "train", "epoch": epoch + 1, "batch": i + 1, "step": state.global_step,
                           "lr": run.lr(), **({"momentum": momentum} if momentum is not None else {}), **means,
                           "img_per_s": round(img_per_s, 2)})
            t_window, window_images = now, 0
        if stepped:
            if not skipped:  # a skipped step changed nothing: no checkpoint of it, no EMA update
                for hook in run.hooks:
                    hook.after_step(state)
            if i + 1 < n_batches and stop.should_stop():
                return images_seen / max(time.perf_counter() - t_epoch, 1e-9), True
    _report_replaced(run, epoch, replaced)
    if skips:
        run.log.info(f"warning: epoch {epoch + 1}: {len(skips)} step(s) skipped for non-finite values")
    return images_seen / max(time.perf_counter() - t_epoch, 1e-9), False


def _log_stage(run: Run, epoch: int) -> None:
    """``[[data.stages]]``: say which stage an epoch is in when it starts one (or the run starts in one)."""
    data = run.recipe.data
    if not data.stages:
        return
    index, augments = data.stage_of(epoch)
    if epoch == run.state.epoch or index != data.stage_of(epoch - 1)[0]:
        run.log.info(f"stage {index + 1}/{len(data.stages)} from epoch {epoch + 1}: augments "
                     f"{', '.join(augments) or 'none (resize only)'}")


def _skipped(run: Run, epoch: int, batch: int, why: str, targets: list[dict[str, Any]]) -> str:
    """Log a skipped micro-batch with its images; stop after train.max_nonfinite in a row (the last good
    checkpoint stays the newest). Every process gets here at the same batch (the skip is decided together)."""
    state = run.state
    state.nonfinite_streak += 1
    files = [str(t.get("file", t["image_id"])) for t in targets]
    what = {"loss": "non-finite loss", "gradients": "non-finite gradients",
            "overflow": "fp16 overflow (the grad scaler lowers its scale)"}[why]
    message = f"epoch {epoch + 1} batch {batch + 1}: {what}, step skipped; images of this process: {', '.join(files)}"
    run.log.info(f"warning: {message}")
    run.log.event({"event": "skipped_step", "epoch": epoch + 1, "batch": batch + 1, "step": state.global_step,
                   "why": why, "files": files})
    limit = run.recipe.train.max_nonfinite
    if why != "overflow" and state.nonfinite_streak >= limit:
        raise TrainingError(
            f"{state.nonfinite_streak} steps in a row had non-finite values (train.max_nonfinite = {limit}), "
            f"the last at epoch {epoch + 1}, batch {batch + 1}: lower optimizer.lr, raise scheduler.warmup_iters "
            "or set train.clip_grad_norm; the newest checkpoint is from before"
        )
    return message


def _report_replaced(run: Run, epoch: int, replaced: list[str]) -> None:
    """Collective: the samples that could not be read this epoch, from every process, in the log."""
    everywhere = gather_object([replaced]) if run.accelerator.num_processes > 1 else [replaced]
    found = [m for part in everywhere for m in part]
    if found:
        run.log.info(f"warning: epoch {epoch + 1}: {len(found)} sample(s) could not be read and were replaced "
                     f"by others (data.on_bad_sample = 'skip'): {'; '.join(found[:3])}"
                     + (f"; and {len(found) - 3} more" if len(found) > 3 else ""))
        run.log.event({"event": "bad_samples", "epoch": epoch + 1, "count": len(found), "samples": found[:100]})


def _any_process(accelerator: Accelerator, flag: torch.Tensor) -> bool:
    """Whether ``flag`` (a bool tensor) is true on any process: one host sync, and with several processes a
    tiny all-reduce, so that every process takes the same branch (a backward that only some processes run
    would leave the others waiting in DDP's all-reduce)."""
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag.float().reshape(1), "sum") > 0
    return bool(flag)


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
    scheduler step. Returns the detached losses (``loss`` = their sum) and why the step was skipped, if it
    was: "loss" (not finite on some process: no process runs the backward), "gradients" (not finite after
    the all-reduce, identical on every process: no optimizer step), "overflow" (fp16: the grad scaler's own
    skip, counted, not fought). A skipped last micro-batch of an accumulation window drops the window: its
    earlier micro-batches' gradients were never all-reduced."""
    skipped = None
    with accelerator.accumulate(model):
        losses = model(to_float_images(images), targets)
        loss = sum(losses.values())
        if _any_process(accelerator, ~torch.isfinite(loss.detach())):
            skipped = "loss"
        else:
            accelerator.backward(loss * loss_weight if loss_weight != 1.0 else loss)
            if accelerator.sync_gradients and accelerator.scaler is None:
                # the norm of the all-reduced gradients (clip with max_norm = inf only measures it)
                norm = accelerator.clip_grad_norm_(model.parameters(), clip_grad_norm or float("inf"))
                if not bool(torch.isfinite(norm)):
                    skipped = "gradients"
            elif accelerator.sync_gradients and clip_grad_norm > 0:
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
