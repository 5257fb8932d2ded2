"""THE training loop: ``train`` (epochs) -> ``train_one_epoch`` (batches) -> ``train_step`` (one micro-batch).

``setup`` (engine/setup.py) builds the parts; this file only loops and calls the hooks. Every process runs
this same control flow; only file writes and printing are main-process-only (RunLog, hooks). The LR
schedule counts optimizer steps of one process (optim/scheduler.py). docs/architecture.md has the picture.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from accel_det.config import Recipe
from accel_det.engine.evaluator import to_float_images
from accel_det.engine.hooks import Hook, TrainState
from accel_det.engine.progress import RunClock, TrainProgress
from accel_det.engine.setup import Run, setup
from accel_det.errors import AccelDetError, TrainingError


def run_training(recipe: Recipe, hooks: Sequence[Hook] = ()) -> TrainState | None:
    """Set up and train; ``None`` when the run dir already holds a finished run."""
    run = setup(recipe, hooks)
    return None if run is None else train(run)


def train(run: Run) -> TrainState:
    recipe, state, log = run.recipe, run.state, run.log
    max_epoch = recipe.train.max_epoch
    clock = RunClock(max_epoch, len(run.train_loader), run.eval_due, len(run.val_loader))
    success, where = False, f"in epoch {state.epoch + 1}/{max_epoch}"
    try:
        for hook in run.hooks:
            hook.before_train(state)
        run.model.train()
        with TrainProgress(log, clock, recipe.train.log_freq) as progress:
            for epoch in range(state.epoch, max_epoch):
                run.train_loader.set_epoch(epoch)
                where = f"in epoch {epoch + 1}/{max_epoch}"
                progress.start_epoch(epoch)
                t0 = time.perf_counter()
                means, img_per_s = train_one_epoch(run, epoch, progress)
                seconds = time.perf_counter() - t0
                state.epoch = epoch + 1
                progress.end_epoch(epoch, means, run.lr(), img_per_s, seconds)
                log.event({"event": "epoch", "epoch": state.epoch, "step": state.global_step,
                           "seconds": round(seconds, 3), "lr": run.lr(), **means, "img_per_s": round(img_per_s, 2)})
                where = f"after epoch {state.epoch}/{max_epoch} (evaluation, checkpoint)"
                for hook in run.hooks:
                    hook.after_epoch(state)
        for hook in run.hooks:
            hook.after_train(state)
        success = True
    except BaseException as exc:
        # stderr gets the error from the CLI wrapper; the run dir must say why and where the run stopped
        log.error(f"stopped {where}, at optimizer step {state.global_step}: {_describe(exc)}")
        raise
    finally:
        run.close(success)
    if state.best_metric is not None:
        log.info(f"best {recipe.eval.metric} {state.best_metric:.4f} at epoch {state.best_epoch}")
    log.info(f"done: {run.run_dir}")
    return state


def _describe(exc: BaseException) -> str:
    if isinstance(exc, AccelDetError):
        return f"error: {exc}"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (KeyboardInterrupt)"
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


class LossMeter:
    """Sums of the losses on the device since the last log line: no host sync per batch, one ``reduce`` (a
    collective, reached by every process at the same batch index) per log line."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.epoch_sums: dict[str, float] = {}
        self.epoch_count = 0

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums[k] + v.float() if k in self.sums else v.float()
        self.count += 1

    def reduce(self, accelerator: Accelerator) -> dict[str, float]:
        means = {k: float(accelerator.reduce(v / self.count, "mean")) for k, v in self.sums.items()}
        for k, v in means.items():
            self.epoch_sums[k] = self.epoch_sums.get(k, 0.0) + v * self.count
        self.epoch_count += self.count
        self.sums, self.count = {}, 0
        return means

    def epoch_means(self) -> dict[str, float]:
        return {k: v / max(self.epoch_count, 1) for k, v in self.epoch_sums.items()}


def train_one_epoch(run: Run, epoch: int, progress: TrainProgress) -> tuple[dict[str, float], float]:
    """One pass over the train loader; returns the epoch's mean losses (all processes) and img/s."""
    acc, state, recipe = run.accelerator, run.state, run.recipe
    n_batches, accum, log_freq = len(run.train_loader), recipe.train.accumulation_freq, recipe.train.log_freq
    # An epoch whose batches are not a multiple of accumulation_freq ends in a short window of `tail`
    # micro-batches. accelerator.backward divides every loss by accumulation_freq, so that last step would
    # average over accumulation_freq batches it did not see: scale its losses to average over the real count
    # (what torchtune does by counting tokens).
    tail = n_batches % accum
    meter = LossMeter()
    images_seen = window_images = 0  # over all processes
    t_window = t_epoch = time.perf_counter()
    for i, (images, targets) in enumerate(run.train_loader):
        weight = accum / tail if tail and i >= n_batches - tail else 1.0
        losses = train_step(acc, run.model, run.optimizer, run.scheduler, images, targets,
                            clip_grad_norm=recipe.train.clip_grad_norm, loss_weight=weight)
        if acc.sync_gradients:
            state.global_step += 1
            for hook in run.hooks:
                hook.after_step(state)
        meter.add(losses)
        images_seen += images.shape[0] * acc.num_processes
        window_images += images.shape[0] * acc.num_processes
        progress.advance(i)
        if meter.count == log_freq or i + 1 == n_batches:
            means = meter.reduce(acc)
            if not math.isfinite(means["loss"]):
                raise TrainingError(
                    f"non-finite loss {means} at epoch {epoch + 1}, step {state.global_step}: lower "
                    "optimizer.lr, raise scheduler.warmup_iters or set train.clip_grad_norm"
                )
            now = time.perf_counter()
            img_per_s = window_images / max(now - t_window, 1e-9)
            progress.update(epoch, i, means, run.lr(), img_per_s)
            run.log.event({"event": "train", "epoch": epoch + 1, "batch": i + 1, "step": state.global_step,
                           "lr": run.lr(), **means, "img_per_s": round(img_per_s, 2)})
            t_window, window_images = now, 0
    return meter.epoch_means(), images_seen / max(time.perf_counter() - t_epoch, 1e-9)


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
) -> dict[str, torch.Tensor]:
    """One micro-batch: forward, backward and, when the accumulation window closes, clip, optimizer and
    scheduler step. Returns the detached losses (``loss`` = their sum)."""
    with accelerator.accumulate(model):
        losses = model(to_float_images(images), targets)
        loss = sum(losses.values())
        accelerator.backward(loss * loss_weight if loss_weight != 1.0 else loss)
        if accelerator.sync_gradients and clip_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), clip_grad_norm)
        # a no-op inside the accumulation window (accelerate's optimizer wrapper checks sync_gradients)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if accelerator.sync_gradients:
        scheduler.step()
    return {"loss": loss.detach(), **{k: v.detach() for k, v in losses.items()}}
