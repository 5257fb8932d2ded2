"""``ReportHook``: the run's plots and report.html at the end of training, and the figures in the trackers that
take images (tensorboard, wandb).

The predictions come from the last evaluation when it scored the final weights (``watch`` keeps the val
evaluator's latest output: its records are the predictions, its result the table and the curves, no second
pass). When none did (``eval.compute_map = false``, or a resumed run that only had its final weights left to
write) the val evaluator runs once more: it is the one way to predict with the model in memory on every
process (sharded, gathered, with rank 0's BatchNorm statistics).

Every process enters the hook; only that evaluation is a collective; the main process alone draws and writes.
A plot that fails is a warning line in the log: it never fails a finished run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from accelerate import Accelerator

from accel_det.config import Recipe
from accel_det.engine.hooks import Hook, TrainState
from accel_det.engine.progress import RunLog
from accel_det.errors import AccelDetError, describe

IMAGE_TRACKERS = ("tensorboard", "wandb")


class _Kept:
    """An evaluator that keeps its latest output (on the main process its records and result)."""

    def __init__(self, evaluator: Any) -> None:
        self.evaluator = evaluator
        self.output: Any = None
        self.calls = 0

    def __call__(self) -> Any:
        self.output = self.evaluator()
        self.calls += 1
        return self.output


class ReportHook(Hook):
    def __init__(self, recipe: Recipe, accelerator: Accelerator, run_dir: Path, log: RunLog, train_set: Any,
                 val_set: Any, ema: bool) -> None:
        self.recipe = recipe
        self.accelerator = accelerator
        self.run_dir = run_dir
        self.log = log
        self.train_set = train_set
        self.val_set = val_set
        self.ema = ema
        self.val: _Kept | None = None
        self._seen_calls = 0
        self._evaluated_at: int | None = None  # optimizer step of the newest val evaluation this session

    def watch(self, evaluators: dict[str, Any]) -> dict[str, Any]:
        """The evaluators, the val one wrapped to keep its latest output (give the result to ``EvalHook``)."""
        self.val = _Kept(evaluators["val"])
        return {**evaluators, "val": self.val}

    def after_epoch(self, state: TrainState) -> None:
        # runs after EvalHook: an evaluation this epoch scored the weights as they are now
        if self.val is not None and self.val.calls != self._seen_calls:
            self._seen_calls, self._evaluated_at = self.val.calls, state.global_step

    def after_train(self, state: TrainState) -> None:
        assert self.val is not None, "ReportHook.watch(evaluators) was not called"
        out = self.val.output if self._evaluated_at == state.global_step else None
        source = f"eval/epoch_{state.epoch:04d}.json"
        if out is None:
            source = "evaluated for this report, not saved in eval/"
            try:
                out = self.val()  # collective: every process predicts its shard
            except AccelDetError as exc:
                if exc.local:  # one process's sample: the others wait in a collective, stop them all
                    raise
                self.log.info(f"warning: report: no val predictions: {describe(exc)}")
        if not self.accelerator.is_main_process:
            return
        try:
            self._write(state, out, source)
        except Exception as exc:  # a finished run is not failed by its report: one line says why
            self.log.info(f"warning: report not written: {describe(exc)}")

    def _write(self, state: TrainState, out: Any, source: str) -> None:
        from accel_det.reporting.build import ReportData, write_report

        weights = f"the final weights{' (EMA)' if self.ema else ''}, epoch {state.epoch}, step {state.global_step}"
        data = ReportData(
            run_dir=self.run_dir, recipe=self.recipe, weights=weights,
            records=out.records if out is not None else None,
            eval_result=out.result if out is not None else None, eval_source=source if out is not None else "",
            train_set=self.train_set, val_set=self.val_set,
        )  # fmt: skip
        written = write_report(data, strict=False, warn=self.log.info)
        for note in written.notes:
            self.log.info(f"note: report: {note}")
        self.log.info(f"report: {self.run_dir / 'report.html'} (plots in {self.run_dir / 'plots'})")
        self._to_trackers([f for f in written.files if f.suffix == ".png"], state.global_step)

    def _to_trackers(self, pngs: list[Path], step: int) -> None:
        trackers = [t for t in self.accelerator.trackers if t.name in IMAGE_TRACKERS]
        if not trackers or not pngs:
            return
        from PIL import Image

        images = {}
        for png in pngs:
            with Image.open(png) as img:
                images[f"report/{png.stem}"] = np.asarray(img.convert("RGB"))
        for tracker in trackers:
            if tracker.name == "tensorboard":  # SummaryWriter.add_images: a batch, channels last here
                tracker.log_images({k: v[None] for k, v in images.items()}, step=step, dataformats="NHWC")
            else:
                tracker.log_images({k: [v] for k, v in images.items()}, step=step)
