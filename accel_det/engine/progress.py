"""Run log (log.txt, metrics.jsonl, trackers) and the progress display. Main process writes; all may call."""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from bisect import bisect_right
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from accel_det.jsonio import strict_json


class RunLog:
    def __init__(self, accelerator: Accelerator, run_dir: Path) -> None:
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.log_path = run_dir / "log.txt"
        self.metrics_path = run_dir / "metrics.jsonl"
        # soft_wrap: a plain log line stays one line when stdout is a file or a pipe
        self.console = Console(stderr=False, highlight=False, soft_wrap=True)

    def info(self, msg: str) -> None:
        if not self.main:
            return
        self.console.print(msg, markup=False)
        with self.log_path.open("a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")

    def print_renderable(self, renderable: Any) -> None:
        if self.main:
            self.console.print(renderable)
            with self.log_path.open("a", encoding="utf-8") as f:
                Console(file=f, width=120, no_color=True).print(renderable)

    def print_table(self, result: dict[str, Any], title: str) -> None:
        from accel_det.metrics import metrics_table

        self.print_renderable(metrics_table(result, title=title))

    def error(self, msg: str, local: bool = False) -> None:
        """A fatal error into log.txt (stderr gets it from the CLI wrapper): the run dir says why it stopped.
        ``local``: only this process hit it (a sample of its shard), so it writes even if it is not the main
        process, tagged with its rank (short appends to one file from two processes do not interleave)."""
        if not (self.main or local) or not self.log_path.parent.is_dir():
            return
        prefix = "" if self.main else f"[rank {self.accelerator.process_index}] "
        with self.log_path.open("a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {prefix}{msg}\n")

    def event(self, record: dict[str, Any], step: int | None = None) -> None:
        """One JSON line in metrics.jsonl; scalar fields also go to the trackers (tensorboard, ...)."""
        if not self.main:
            return
        record = {"time": round(time.time(), 3), **record}
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(strict_json(record), default=_jsonable) + "\n")
        if self.accelerator.trackers:
            kind = record.get("event", "log")
            if record.get("split") not in (None, "val"):  # val2's numbers beside val's, not over them
                kind = f"{kind}_{record['split']}"
            scalars = {
                f"{kind}/{k}": float(v)
                for k, v in record.items()
                if isinstance(v, int | float) and not isinstance(v, bool)
                and k not in ("time", "epoch", "step", "batch") and math.isfinite(float(v))
            }
            self.accelerator.log(scalars, step=step if step is not None else record.get("step"))


def _jsonable(v: Any) -> Any:
    try:
        return float(v)
    except (TypeError, ValueError):
        return str(v)


def format_seconds(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(max(seconds, 0.0)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class RunClock:
    """The ETA of the whole run from measured rates: seconds per training batch and the time spent between
    epochs (evaluation and checkpoints), measured separately for epochs with and without an evaluation. Until
    the first evaluation is timed it is estimated as the val batches at a third of a training batch each (a
    forward pass without backward). Each rate is the median over the last ``RECENT`` epochs: it follows a
    machine whose speed changes, and one epoch slowed by a burst of load elsewhere does not swing it. Until an
    epoch has finished, the current one's batches give the rate; the session's first batch carries the
    start-up (DataLoader workers, allocations, compilation) and counts only while it is all there is. A time
    budget (engine/budget.py) plans the run's epochs from the same numbers."""

    RECENT = 5

    def __init__(self, max_epoch: int, batches_per_epoch: int, eval_due: Callable[[int], bool],
                 val_batches: int) -> None:
        self.max_epoch = max_epoch
        self.batches = batches_per_epoch
        self.eval_due = eval_due
        self.val_batches = val_batches
        self.first: tuple[int, float] | None = None  # (batches, seconds) of the session's first add_batches
        self.epochs: list[tuple[int, float]] = []  # (batches, seconds) of each finished epoch, the first left out
        self.current = (0, 0.0)  # the same for the epoch in progress
        self.between: dict[bool, list[float]] = {True: [], False: []}  # eval ran -> seconds after epochs

    def add_batches(self, n: int, seconds: float) -> None:
        if self.first is None:
            self.first = (n, seconds)
        else:
            self.current = (self.current[0] + n, self.current[1] + seconds)

    def end_epoch(self) -> None:
        if self.current[0]:
            self.epochs.append(self.current)
        self.current = (0, 0.0)

    def measured_batches(self) -> int:
        """Batches timed this session, the first left out."""
        return sum(n for n, _ in self.epochs) + self.current[0]

    def per_batch(self) -> float | None:
        """Seconds per training batch, recently; None before any batch."""
        if self.epochs:
            return statistics.median(s / n for n, s in self.epochs[-self.RECENT:])
        if self.current[0]:
            return self.current[1] / self.current[0]
        return self.first[1] / self.first[0] if self.first is not None and self.first[0] else None

    def add_between(self, epoch: int, seconds: float) -> None:
        self.between[self.eval_due(epoch)].append(seconds)

    def recent_between(self, evaluated: bool) -> float | None:
        """The recent time of an epoch end with (or without) an evaluation; None before one."""
        seen = self.between[evaluated][-self.RECENT:]
        return statistics.median(seen) if seen else None

    def _after(self, epoch: int, per_batch: float) -> float:
        kind = self.eval_due(epoch)
        seen = self.recent_between(kind)
        if seen is not None:
            return seen
        return self.val_batches * per_batch / 3 if kind else 0.0

    def eta(self, epoch: int, batches_done: int) -> float | None:
        """Seconds left, standing in 0-based ``epoch`` after ``batches_done`` of its batches."""
        per_batch = self.per_batch()
        if per_batch is None:
            return None
        batches_left = (self.batches - batches_done) + (self.max_epoch - epoch - 1) * self.batches
        return batches_left * per_batch + sum(self._after(e, per_batch) for e in range(epoch + 1, self.max_epoch + 1))


class TrainProgress:
    """A rich bar on a TTY (this epoch's batches, the whole run's ETA); otherwise a plain line every
    ``log_freq`` batches. The epoch summary is a log line in both cases, so it stays on screen."""

    def __init__(self, log: RunLog, clock: RunClock, log_freq: int) -> None:
        self.log = log
        self.clock = clock
        self.max_epoch = clock.max_epoch
        self.batches = clock.batches
        self.log_freq = log_freq
        self.live = log.main and sys.stdout.isatty()
        self._bar: Progress | None = None
        self._task: Any = None
        self._t_batch = time.perf_counter()
        self._t_epoch_end: float | None = None
        self._epoch = 0

    def __enter__(self) -> TrainProgress:
        if self.live:
            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TextColumn("run ETA {task.fields[eta]}"),
                console=self.log.console,
            )
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def close_gap(self, epoch: int) -> None:
        """Time what the hooks took after the previous epoch (``epoch`` of them done); ``start_epoch`` does it
        too if this was not called first (a time budget calls it to plan with the time)."""
        if self._t_epoch_end is not None:
            self.clock.add_between(epoch, time.perf_counter() - self._t_epoch_end)
            self._t_epoch_end = None

    def set_max_epoch(self, max_epoch: int) -> None:
        """The run's length changed (a time budget planned it): the ETA and the epoch counts follow."""
        self.max_epoch = self.clock.max_epoch = max_epoch
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, description=f"epoch {self._epoch + 1}/{max_epoch}")

    def start_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.close_gap(epoch)
        self._epoch, self._t_batch = epoch, time.perf_counter()
        if self._bar is not None:
            if self._task is not None:
                self._bar.remove_task(self._task)
            eta = format_seconds(self.clock.eta(epoch, start_batch))
            self._task = self._bar.add_task(f"epoch {epoch + 1}/{self.max_epoch}", total=self.batches,
                                            completed=start_batch, stats="", eta=eta)

    def advance(self, batch: int) -> None:
        """Every batch: time it and move the bar (the numbers come with ``update`` every log_freq batches)."""
        now = time.perf_counter()
        self.clock.add_batches(1, now - self._t_batch)
        self._t_batch = now
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=batch + 1)

    def eta(self, batch: int) -> str:
        return format_seconds(self.clock.eta(self._epoch, batch + 1))

    def update(self, epoch: int, batch: int, losses: dict[str, float], lr: float, img_per_s: float) -> None:
        stats = " ".join(f"{k} {v:.4f}" for k, v in losses.items()) + f" lr {lr:.2e} {img_per_s:.1f} img/s"
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=batch + 1, stats=stats, eta=self.eta(batch))
        elif self.log.main and ((batch + 1) % self.log_freq == 0 or batch + 1 == self.batches):
            self.log.info(f"epoch {epoch + 1}/{self.max_epoch} batch {batch + 1}/{self.batches} {stats} "
                          f"ETA {self.eta(batch)}")

    def end_epoch(self, epoch: int, losses: dict[str, float], lr: float, img_per_s: float, seconds: float) -> None:
        stats = " ".join(f"{k} {v:.4f}" for k, v in losses.items())
        self.log.info(f"epoch {epoch + 1}/{self.max_epoch} done in {seconds:.1f} s: {stats} lr {lr:.2e} "
                      f"{img_per_s:.1f} img/s, run ETA {self.eta(self.batches - 1)}")
        self.clock.end_epoch()
        self._t_epoch_end = time.perf_counter()


class LossMeter:
    """Sums of the losses on the device since the last log line: no host sync per batch, one ``reduce`` (a
    collective, reached by every process at the same batch index) per log line. The reduced values also
    accumulate in the ``TrainState`` (``epoch_loss_sums``), so the epoch's mean survives a mid-epoch
    checkpoint; and a run stopped by a signal inside a log window ``park``s the window so far in the state, so
    the resumed run's log lines cover the same batches as an uninterrupted run's."""

    def __init__(self, state: Any) -> None:
        self.state = state
        self.sums: dict[str, torch.Tensor] = {}
        self.parked = dict(state.window_loss_sums)  # already reduced over processes
        self.count = state.window_loss_count
        state.window_loss_sums, state.window_loss_count = {}, 0

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums[k] + v.float() if k in self.sums else v.float()
        self.count += 1

    def reduce(self, accelerator: Accelerator) -> dict[str, float]:
        # the mean over processes of each process's window sum, plus what was parked, over the window's size
        means = {k: (float(accelerator.reduce(v, "mean")) + self.parked.get(k, 0.0)) / self.count
                 for k, v in self.sums.items()}
        sums = self.state.epoch_loss_sums
        for k, v in means.items():
            sums[k] = sums.get(k, 0.0) + v * self.count
        self.state.epoch_loss_count += self.count
        self.sums, self.parked, self.count = {}, {}, 0
        return means

    def park(self, accelerator: Accelerator) -> None:
        """Collective: the window so far into the state (a checkpoint is about to be taken mid-window)."""
        self.state.window_loss_sums = {k: float(accelerator.reduce(v, "mean")) + self.parked.get(k, 0.0)
                                       for k, v in self.sums.items()}
        self.state.window_loss_count = self.count


def log_stage(log: RunLog, data: Any, epoch: int, first: bool, starts: list[int] | None = None) -> None:
    """``[[data.stages]]``: name the stage an epoch starts (and the one a run starts or resumes in). ``starts``:
    the stages' first epochs when a time budget moved them (else ``data``'s)."""
    if not data.stages:
        return
    starts = starts if starts is not None else data.stage_starts()

    def index(e: int) -> int:
        return max(bisect_right(starts, e) - 1, 0)

    i = index(epoch)
    if first or i != index(epoch - 1):
        augments = data.stages[i].augments or []
        log.info(f"stage {i + 1}/{len(data.stages)} from epoch {epoch + 1}: augments "
                 f"{', '.join(augments) or 'none (resize only)'}")


def report_replaced(log: RunLog, accelerator: Accelerator, epoch: int, replaced: list[str]) -> None:
    """Collective: the samples that could not be read this epoch, from every process, in the log."""
    from accelerate.utils import gather_object

    everywhere = gather_object([replaced]) if accelerator.num_processes > 1 else [replaced]
    found = [m for part in everywhere for m in part]
    if found:
        log.info(f"warning: epoch {epoch + 1}: {len(found)} sample(s) could not be read and were replaced "
                 f"by others (data.on_bad_sample = 'skip'): {'; '.join(found[:3])}"
                 + (f"; and {len(found) - 3} more" if len(found) > 3 else ""))
        log.event({"event": "bad_samples", "epoch": epoch + 1, "count": len(found), "samples": found[:100]})
