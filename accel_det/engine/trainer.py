"""THE training loop. It reads top to bottom: build everything from the recipe, resume, loop, hooks.

Every process runs this same control flow; only file writes and printing are main-process-only (RunLog,
hooks). The LR schedule counts optimizer steps of one process (see optim/scheduler.py).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed

from accel_det.data import build_datasets, build_loaders
from accel_det.engine.checkpoint import Checkpointer, CheckpointError, resolve_checkpoint
from accel_det.engine.distributed import build_accelerator, environment, lock_run_dir, write_json_atomic
from accel_det.engine.evaluator import to_float_images
from accel_det.engine.hooks import CheckpointHook, Context, EvalHook, Hook, TrainState
from accel_det.engine.progress import RunLog, TrainProgress
from accel_det.errors import TrainingError
from accel_det.models import build_model
from accel_det.optim import build_optimizer, build_scheduler, jump_to_step


def _resume_from(recipe: Any, run_dir: Path) -> Path | None:
    spec = recipe.output.resume
    if spec == "never":
        if (run_dir / "checkpoints" / "last").exists():
            raise CheckpointError(
                f"{run_dir}: already holds checkpoints and output.resume = 'never'; use another "
                "mission.round (or output.resume = 'auto' to continue) so nothing is overwritten"
            )
        return None
    return resolve_checkpoint(run_dir, "auto" if spec == "auto" else spec)


def _flat_config(recipe: Any) -> dict[str, Any]:
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


def train(recipe: Any, hooks: list[Hook] | None = None) -> TrainState:
    run_dir = recipe.run_dir()
    accelerator = build_accelerator(recipe, run_dir, trackers=recipe.log.trackers)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    run_lock = lock_run_dir(accelerator, run_dir)
    log = RunLog(accelerator, run_dir)
    set_seed(recipe.train.seed)
    resume_path = _resume_from(recipe, run_dir)

    # the main process generates/indexes data first (synthetic data is written once, not N times)
    with accelerator.main_process_first():
        train_ds, val_ds = build_datasets(recipe)
    train_loader, val_loader = build_loaders(recipe, train_ds, val_ds, seed=recipe.train.seed)

    model, load_report = build_model(recipe)
    if load_report is not None:
        log.info(f"weights: {load_report.summary()}")
    optimizer = build_optimizer(model, recipe.optimizer)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    # Same seed everywhere up to here (same init, same shuffle via data_seed); from now on each process draws
    # its own augmentations (num_workers=0 uses these RNGs; workers mix in the rank in seed_worker).
    set_seed(recipe.train.seed, device_specific=True)
    accum = recipe.train.accumulation_freq
    steps_per_epoch = math.ceil(len(train_loader) / accum)
    # Not passed to prepare(): its wrapper would step num_processes times per optimizer step. Not saved in
    # checkpoints either: the LR is a pure function of global_step, rebuilt from the recipe on resume.
    scheduler = build_scheduler(optimizer, recipe.scheduler, steps_per_epoch, recipe.train.max_epoch)

    state = TrainState()
    checkpointer = Checkpointer(accelerator, run_dir, recipe.output.keep_last)
    if resume_path is not None:
        saved = checkpointer.load(resume_path)
        state.epoch, state.global_step = int(saved["epoch"]), int(saved["global_step"])
        if saved.get("steps_per_epoch") not in (None, steps_per_epoch):
            # Another process count, batch size or accumulation: the schedule is defined in epochs, and the
            # checkpoint sits at an epoch end, so re-express the position in the new epoch length.
            log.info(f"note: epochs had {saved['steps_per_epoch']} optimizer steps, now {steps_per_epoch}; "
                     f"continuing the schedule at epoch {state.epoch}")
            state.global_step = state.epoch * steps_per_epoch
        state.best_metric, state.best_epoch = saved.get("best_metric"), saved.get("best_epoch")
        jump_to_step(scheduler, state.global_step)
        log.info(f"resumed from {resume_path} (epoch {state.epoch}, step {state.global_step})")
        # metrics.jsonl may hold events past this checkpoint (a run killed mid-epoch): mark where we resumed
        log.event({"event": "resume", "epoch": state.epoch, "step": state.global_step, "from": str(resume_path)})
    # written only now: a resume that fails (another model, a corrupt checkpoint) must not replace the
    # recipe of the run it refused to touch
    if accelerator.is_main_process:
        write_json_atomic(run_dir / "recipe.json", recipe.model_dump(mode="json"))
        write_json_atomic(run_dir / "env.json", environment(accelerator, recipe))
    if recipe.log.trackers:
        accelerator.init_trackers("tensorboard", config=_flat_config(recipe))

    env = environment(accelerator, recipe)
    log.info(
        f"run dir {run_dir} | {recipe.model.name} | {len(train_ds)} train / {len(val_ds)} val images | "
        f"{accelerator.num_processes} process(es) on {accelerator.device}, "
        f"mixed precision {accelerator.mixed_precision} | batch {recipe.data.batch_size}/process, "
        f"effective {env['effective_batch']} | {steps_per_epoch} optimizer steps/epoch"
    )
    ctx = Context(recipe, accelerator, model, optimizer, scheduler, val_loader, run_dir, log, state,
                  val_ds.category_ids, steps_per_epoch)
    hooks = [EvalHook(), CheckpointHook(checkpointer), *(hooks or [])]
    batch_imgs = recipe.data.batch_size * accelerator.num_processes
    log_freq = recipe.train.log_freq

    model.train()
    with TrainProgress(log, recipe.train.max_epoch, len(train_loader), log_freq) as progress:
        for epoch in range(state.epoch, recipe.train.max_epoch):
            train_loader.set_epoch(epoch)
            progress.start_epoch(epoch)
            sums: dict[str, torch.Tensor] = {}
            n_since, t_since, t_epoch = 0, time.perf_counter(), time.perf_counter()
            for i, (images, targets) in enumerate(train_loader):
                with accelerator.accumulate(model):
                    losses = model(to_float_images(images), targets)
                    loss = sum(losses.values())
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and recipe.train.clip_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), recipe.train.clip_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                if accelerator.sync_gradients:
                    scheduler.step()
                    state.global_step += 1
                    for h in hooks:
                        h.after_step(ctx)
                for k, v in (("loss", loss), *losses.items()):
                    sums[k] = sums.get(k, 0) + v.detach().float()
                n_since += 1
                progress.advance(i)
                if n_since == log_freq or i + 1 == len(train_loader):
                    # the reduce is a collective: every process reaches it at the same batch indices
                    means = {k: float(accelerator.reduce(v / n_since, "mean")) for k, v in sums.items()}
                    if not math.isfinite(means["loss"]):
                        raise TrainingError(
                            f"non-finite loss {means} at epoch {epoch + 1}, step {state.global_step}: "
                            "lower optimizer.lr, raise scheduler.warmup_iters or set train.clip_grad_norm"
                        )
                    ips = batch_imgs * n_since / max(time.perf_counter() - t_since, 1e-9)
                    lr = ctx.lr()
                    progress.update(epoch, i, means, lr, ips)
                    log.event({"event": "train", "epoch": epoch + 1, "batch": i + 1,
                               "step": state.global_step, "lr": lr, **means, "img_per_s": round(ips, 2)})
                    sums, n_since, t_since = {}, 0, time.perf_counter()
            state.epoch = epoch + 1
            log.event({"event": "epoch", "epoch": state.epoch, "step": state.global_step,
                       "seconds": round(time.perf_counter() - t_epoch, 3), "lr": ctx.lr()})
            for h in hooks:
                h.after_epoch(ctx)
    for h in hooks:
        h.after_train(ctx)
    if state.best_metric is not None:
        log.info(f"best {recipe.eval.metric} {state.best_metric:.4f} at epoch {state.best_epoch}")
    log.info(f"done: {run_dir}")
    accelerator.end_training()
    if run_lock is not None:
        run_lock.close()
    return state
