"""Build the Accelerator from the recipe and the launcher, and refuse the silent failure modes.

Traps guarded here (each one trains, but wrongly):
- ``accelerate launch --multi_gpu --num_processes 2`` (or torchrun) on a machine without CUDA: unless the
  script asks for ``Accelerator(cpu=True)``, accelerate picks no backend and every process trains alone,
  N copies overwriting one run dir. With no GPU visible we always ask for ``cpu=True`` (gloo), and if the
  launcher still asked for N > 1 processes but we got one, we stop.
- ``gpu_train = true`` on a machine without a visible GPU: stop instead of silently training on CPU.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

from accel_det.errors import AccelDetError, LaunchError, RecipeError, Stopped, world_size
from accel_det.optim.loss_scale import grad_scaler_kwargs
from accel_det.trackers import missing_tracker_packages

T = TypeVar("T")


def build_accelerator(recipe: Any, run_dir: Path | None = None, trackers: list[str] | None = None) -> Accelerator:
    gpu = torch.cuda.is_available()
    if recipe.train.gpu_train is True and not gpu:
        raise LaunchError(
            "train.gpu_train = true but no CUDA GPU is visible; set train.gpu_train = 'auto' (or false) "
            "to train on the CPU"
        )
    cpu = recipe.train.gpu_train is False or not gpu
    mp = None if recipe.train.mixed_precision == "auto" else recipe.train.mixed_precision
    if cpu and (mp or os.environ.get("ACCELERATE_MIXED_PRECISION")) == "fp16":
        raise LaunchError("fp16 mixed precision needs a GPU; on the CPU use train.mixed_precision = 'bf16' or 'no'")
    if gpu and not cpu:
        torch.backends.cudnn.benchmark = recipe.train.cudnn_benchmark
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=mp,
        gradient_accumulation_steps=recipe.train.accumulation_freq,
        log_with=trackers or None,
        project_config=(ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard"))
                        if run_dir else None),
        # a seedable sampler reshuffles from seed + epoch: epoch e sees the same order whether the run was
        # resumed or not, and for every process count
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=recipe.train.seed),
        step_scheduler_with_optimizer=False,
        # train.loss_scale: the fp16 grad scaler's start and growth (unused without fp16)
        kwargs_handlers=[grad_scaler_kwargs(recipe.train.loss_scale)],
    )
    if not accelerator.is_main_process:
        _prefix_warnings(accelerator.process_index)
    want = world_size()
    if want > 1 and accelerator.num_processes != want:
        raise LaunchError(
            f"the launcher started {want} processes but the Accelerator joined {accelerator.num_processes}: "
            "each would train alone and overwrite the same run dir. On a CPU machine launch with "
            "`accelerate launch --config_file accelerate_configs/cpu_2proc.yaml` or "
            "`torchrun --nproc_per_node N -m accel_det.train ...`; on GPUs check CUDA_VISIBLE_DEVICES; in your "
            "own script, build no accelerate state (PartialState/Accelerator) before accel_det's"
        )
    return accelerator


def _prefix_warnings(rank: int) -> None:
    """Non-main processes print nothing of their own, but their warnings still reach stderr: tag them with the
    rank so that N copies of one warning are told apart from N different problems."""
    import logging
    import warnings

    show = warnings.showwarning

    def showwarning(message: Any, category: type[Warning], filename: str, lineno: int,
                    file: Any = None, line: str | None = None) -> None:
        show(f"[rank {rank}] {message}", category, filename, lineno, file, line)

    warnings.showwarning = showwarning
    fmt = logging.Formatter(f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setFormatter(fmt)
    if not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(fmt)
        logging.getLogger().addHandler(handler)


def _git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path.cwd()
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(accelerator: Accelerator, recipe: Any) -> dict[str, Any]:
    import accelerate
    import torchvision

    import accel_det

    per_process = recipe.data.batch_size
    return {
        "argv": sys.argv,
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            "accel_det": accel_det.__version__,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "accelerate": accelerate.__version__,
        },
        "git_sha": _git_sha(),
        "accelerate": {
            "distributed_type": str(accelerator.distributed_type),
            "num_processes": accelerator.num_processes,
            "mixed_precision": accelerator.mixed_precision,
            "device": str(accelerator.device),
            "gradient_accumulation_steps": accelerator.gradient_accumulation_steps,
        },
        "effective_batch": per_process * accelerator.num_processes * recipe.train.accumulation_freq,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def lock_run_dir(accelerator: Accelerator, run_dir: Path) -> Any:
    """Collective: create the run dir and take its lock, or fail with one line on every process.

    The main process holds an exclusive POSIX lock (``lockf``) on ``run_dir/.lock`` for the whole run, so a
    second launch on the same run dir stops at once instead of interleaving checkpoints and logs with the
    first. The kernel drops the lock when the process dies, so a killed run never leaves a stale lock.
    Release it with ``handle.close()``."""
    from accelerate.utils import broadcast_object_list

    handle, error = None, ""
    if accelerator.is_main_process:
        import fcntl

        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            handle = (run_dir / ".lock").open("a+", encoding="utf-8")
        except OSError as exc:
            error = (f"output.root: cannot write the run dir {run_dir}: {exc.strerror or exc} (choose a writable "
                     "output.root)")
        else:
            try:
                # lockf, not flock: forked DataLoader workers share a flock with their parent and would keep
                # the run dir locked after a kill -9 of the main process until they notice and exit
                fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # EACCES or EAGAIN: held by another process
                handle.seek(0)
                holder = handle.read().strip() or "unknown process"
                handle.close()
                handle = None
                error = (f"{run_dir}: another run is using this run dir ({holder}); wait for it to finish or "
                         "choose another mission.round")
            else:
                handle.seek(0)
                handle.truncate()
                handle.write(f"host {socket.gethostname()} pid {os.getpid()}\n")
                handle.flush()
    message = [error]
    broadcast_object_list(message, from_process=0)
    if message[0]:
        raise LaunchError(message[0])
    return handle


def main_process_first(accelerator: Accelerator, build: Callable[[], T]) -> T:
    """Collective: ``build()`` on the main process first (it generates or indexes data once for all), then on
    the others. If it fails on the main process, every process raises the same one-line error, instead of the
    others dying in a barrier with a backend traceback."""
    if accelerator.num_processes == 1:
        return build()
    from accelerate.utils import broadcast_object_list

    result, failure = None, [None]
    if accelerator.is_main_process:
        try:
            result = build()
        except Stopped:
            raise  # a signal: the launcher stops the others
        except AccelDetError as exc:
            failure = [(type(exc), str(exc))]
    broadcast_object_list(failure, from_process=0)
    if failure[0] is not None:
        kind, message = failure[0]
        raise kind(message)
    return result if accelerator.is_main_process else build()


def check_trackers(trackers: list[str]) -> None:
    """Accelerate skips a tracker whose package is missing without a word: stop before training instead."""
    problems = missing_tracker_packages(trackers)
    if problems:
        raise RecipeError(problems[0] + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""))
