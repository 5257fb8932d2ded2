"""Run log (log.txt, metrics.jsonl, trackers) and the progress display. Main process writes; all may call."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from accel_det.engine.distributed import strict_json


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

    def event(self, record: dict[str, Any], step: int | None = None) -> None:
        """One JSON line in metrics.jsonl; scalar fields also go to the trackers (tensorboard, ...)."""
        if not self.main:
            return
        record = {"time": round(time.time(), 3), **record}
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(strict_json(record), default=_jsonable) + "\n")
        if self.accelerator.trackers:
            kind = record.get("event", "log")
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


class TrainProgress:
    """A rich bar on a TTY; otherwise a plain line every ``log_freq`` batches (logs, CI, nohup)."""

    def __init__(self, log: RunLog, max_epoch: int, batches_per_epoch: int, log_freq: int) -> None:
        self.log = log
        self.max_epoch = max_epoch
        self.batches = batches_per_epoch
        self.log_freq = log_freq
        self.live = log.main and sys.stdout.isatty()
        self._bar: Progress | None = None
        self._task = None

    def __enter__(self) -> TrainProgress:
        if self.live:
            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.log.console,
            )
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def start_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if self._bar is not None:
            if self._task is not None:
                self._bar.remove_task(self._task)
            self._task = self._bar.add_task(
                f"epoch {epoch + 1}/{self.max_epoch}", total=self.batches, completed=start_batch, stats=""
            )

    def advance(self, batch: int) -> None:
        """Every batch: move the bar (cheap; the numbers come with ``update`` every log_freq batches)."""
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=batch + 1)

    def update(self, epoch: int, batch: int, losses: dict[str, float], lr: float, img_per_s: float) -> None:
        stats = " ".join(f"{k} {v:.4f}" for k, v in losses.items()) + f" lr {lr:.2e} {img_per_s:.1f} img/s"
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=batch + 1, stats=stats)
        elif self.log.main and ((batch + 1) % self.log_freq == 0 or batch + 1 == self.batches):
            self.log.info(f"epoch {epoch + 1}/{self.max_epoch} batch {batch + 1}/{self.batches} {stats}")

    def print(self, msg: str) -> None:
        self.log.info(msg)
