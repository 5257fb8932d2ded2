"""``train.time_budget_minutes``: how many epochs fit the budget, planned while the run trains.

A budgeted run starts with a provisional length (``train.max_epoch``'s default) and plans its epochs as soon as
the first optimizer steps are timed, then again at the start of every epoch (after the previous epoch's
evaluation and checkpoint, so their cost is measured too). The plan is the most epochs whose predicted end
-- the epochs left, the evaluations the plan implies (every ``eval.freq`` epochs and always after the last),
the other epoch ends (checkpoints), and the final phase (final weights) -- falls within the budget; never
fewer than the epoch being trained. When the planned epochs change, the run is fitted to them: the cosine's
length (optim/scheduler.py ``set_length``; warmup stays in steps), the ``[[data.stages]]`` spans
(proportional to their ``epochs``), the hooks' idea of the last epoch (it evaluates and saves), and the ETA.
The schedule's rest is re-timed from the current step, so the LR goes on from where it is (no jump) and
reaches the schedule's end at the planned last step; nothing changes while the planned epochs stay the same.

Every process must take the same decisions (a different last epoch means a collective one process never
enters): the main process plans from its timings and broadcasts the number, at points every process reaches
at the same step. The plan -- planned epochs, budget used so far, the cost estimates -- is saved in every
checkpoint's trainer_state.json: a resumed run keeps its plan until it has timed its own epochs, and the
training time of the earlier attempts (up to their checkpoint) counts against the budget. The budget clock
starts when training starts (after data and model are set up) and stops once the final weights are written;
the report drawn after them (plots/, report.html: seconds) is outside the budget, and the log says how long
it took.

A plan is kept while its predicted end stays within 1 % of the budget (``TOLERANCE``): the noise of a shared
machine does not re-plan the run at every epoch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from accelerate.utils import broadcast_object_list

from accel_det.engine.progress import RunClock, TrainProgress, format_seconds
from accel_det.optim.scheduler import set_length

if TYPE_CHECKING:
    from accel_det.config import Recipe
    from accel_det.engine.setup import Run

_MAX_EPOCHS = 1_000_000  # a bound for the search: a budget of years over epochs of microseconds
TOLERANCE = 0.01  # a plan whose predicted end is this close to the budget (either side) is kept


@dataclass(frozen=True)
class Costs:
    """Seconds, as measured (or estimated until measured)."""

    batch_s: float  # one training batch (micro-batch) of one process
    eval_s: float  # an epoch end with an evaluation (its checkpoint included)
    between_s: float  # an epoch end without one (periodic checkpoints, averaged)
    final_s: float  # after the last epoch's end: the final weights


def evaluations(epochs_done: int, epochs: int, freq: int, compute_map: bool) -> int:
    """Epoch ends with an evaluation among epochs ``epochs_done + 1 .. epochs`` (``EvalHook.due``'s rule:
    every ``freq`` epochs and after the last)."""
    if not compute_map or epochs <= epochs_done:
        return 0
    periodic = (epochs - 1) // freq - epochs_done // freq if freq > 0 else 0
    return max(periodic, 0) + 1


def predicted_seconds(epochs: int, used_s: float, epochs_done: int, batches_done: int, batches_per_epoch: int,
                      costs: Costs, eval_freq: int, compute_map: bool) -> float:
    """When a run of ``epochs`` epochs would end, standing ``batches_done`` batches into epoch ``epochs_done``
    (0-based) after ``used_s`` seconds."""
    batches_left = epochs * batches_per_epoch - (epochs_done * batches_per_epoch + batches_done)
    n_eval = evaluations(epochs_done, epochs, eval_freq, compute_map)
    n_other = max(epochs - epochs_done, 0) - n_eval
    return (used_s + max(batches_left, 0) * costs.batch_s + n_eval * costs.eval_s + n_other * costs.between_s
            + costs.final_s)


def plan_epochs(budget_s: float, used_s: float, epochs_done: int, batches_done: int, batches_per_epoch: int,
                costs: Costs, eval_freq: int, compute_map: bool) -> int:
    """The most epochs whose predicted end is within ``budget_s``; at least ``epochs_done + 1`` (the epoch being
    trained or about to start is finished whatever the budget says). Each further epoch adds cost, so the
    predicted end grows with the epochs and a binary search finds the last one that fits."""
    def fits(epochs: int) -> bool:
        return predicted_seconds(epochs, used_s, epochs_done, batches_done, batches_per_epoch, costs, eval_freq,
                                 compute_map) <= budget_s

    lo = epochs_done + 1
    if not fits(lo):
        return lo
    hi = lo + 1
    while hi < _MAX_EPOCHS and fits(hi):
        lo, hi = hi, min(2 * hi, _MAX_EPOCHS)
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def stage_starts(stage_epochs: Sequence[int], epochs: int) -> list[int]:
    """``[[data.stages]]`` fitted to ``epochs``: each stage gets a share proportional to its ``epochs`` (largest
    remainders, ties to the earlier stage), at least one epoch each while there are as many epochs as stages
    (a short closing stage, such as the last epochs without mosaic, is not rounded away). Returns the 0-based
    first epoch of each stage; a stage left without epochs starts where the next does."""
    total = sum(stage_epochs)
    quotas = [epochs * e / total for e in stage_epochs]
    counts = [math.floor(q) for q in quotas]
    if epochs >= len(stage_epochs):
        counts = [max(c, 1) for c in counts]
    while sum(counts) > epochs:  # the minimum of one took epochs from the others: from the most over quota
        i = max((i for i, c in enumerate(counts) if c > 1), key=lambda i: (counts[i] - quotas[i], -i))
        counts[i] -= 1
    while sum(counts) < epochs:
        i = max(range(len(counts)), key=lambda i: (quotas[i] - counts[i], -i))
        counts[i] += 1
    starts, at = [], 0
    for c in counts:
        starts.append(at)
        at += c
    return starts


def run_length(recipe: Recipe, trainer_state: dict[str, Any]) -> int | None:
    """The epochs a run checkpointed with ``trainer_state`` lasts: ``train.max_epoch``, or a budgeted run's
    planned epochs (None before its plan was measured: not finished, whatever its epoch)."""
    if recipe.train.time_budget_minutes is None:
        return recipe.train.max_epoch
    plan = trainer_state.get("budget") or {}
    return int(plan["epochs"]) if plan.get("measured") else None


class TimeBudget:
    """The plan of a budgeted run (module docstring), built by ``train`` and called by it at its plan points:
    ``before_epoch`` and ``after_step``. ``epochs`` is the planned number of epochs."""

    def __init__(self, run: Run, clock: RunClock, progress: TrainProgress) -> None:
        recipe, state = run.recipe, run.state
        assert recipe.train.time_budget_minutes is not None
        self.run, self.clock, self.progress = run, clock, progress
        self.minutes = recipe.train.time_budget_minutes
        self.budget_s = 60.0 * self.minutes
        self.batches_per_epoch = len(run.train_loader)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / recipe.train.accumulation_freq)
        saved = state.budget or {}
        self.used_before = float(saved.get("used_s", 0.0))
        self.t0 = time.perf_counter()
        self.step0 = state.global_step
        self.measured = bool(saved.get("measured", False))
        self.saved_costs = Costs(**saved["costs"]) if saved.get("costs") else None
        anchor = None
        schedule = saved.get("schedule")
        if schedule:  # where the saved plan re-timed the LR schedule, in this run's steps per epoch
            step, progress = schedule["anchor"]
            anchor = (round(step * self.steps_per_epoch / schedule["steps_per_epoch"]), float(progress))
        self.costs = self.saved_costs
        # the first plan: after a few timed steps (the first step carries the start-up and is not extrapolated)
        self.first_plan_step = min(max(2, self.steps_per_epoch // 10), 20)
        self.epochs = int(saved["epochs"]) if saved else recipe.train.max_epoch
        self.said_short = False
        self.stopped_at: float | None = None  # used_s when the final weights were written
        self.stage_starts: list[int] | None = None  # [[data.stages]] fitted to the plan
        state.budget_live = self.record
        self.anchor: tuple[int, float] = (0, 0.0)
        self._apply(anchor)
        if saved:
            run.log.info(f"time budget {self.minutes:g} min: {format_seconds(self.used_before)} used before this "
                         f"resume; {self.epochs} epochs planned")
        else:
            run.log.info(f"time budget {self.minutes:g} min: the epochs are planned once the first "
                         f"{self.first_plan_step} optimizer steps are timed (provisionally {self.epochs})")
        self._event(start=True)

    def used_s(self) -> float:
        """The budget used so far (earlier attempts included); it stops with the final weights."""
        return self.stopped_at if self.stopped_at is not None else self._elapsed()

    def _elapsed(self) -> float:
        return self.used_before + time.perf_counter() - self.t0

    def record(self) -> dict[str, Any]:
        """What a checkpoint keeps of the plan (trainer_state.json ``budget``)."""
        return {"minutes": self.minutes, "epochs": self.epochs, "measured": self.measured,
                "used_s": round(self.used_s(), 3),
                "schedule": {"anchor": list(self.anchor), "steps_per_epoch": self.steps_per_epoch},
                "costs": {k: round(v, 6) for k, v in asdict(self.costs).items()} if self.costs else None}

    # -- plan points: every process calls them at the same step ----------------------------------------------

    def before_epoch(self) -> None:
        """Re-plan at an epoch's start once this attempt has timed batches (a resumed run keeps its plan until
        then)."""
        if self.clock.measured_batches():
            self._plan()

    def after_step(self) -> None:
        """The first plan of a run, after its first few optimizer steps (and not at an epoch's last batch:
        ``before_epoch`` plans next)."""
        state = self.run.state
        if (not self.measured and state.global_step - self.step0 == self.first_plan_step
                and state.batch_in_epoch < self.batches_per_epoch):
            self._plan()

    def weights_written(self) -> None:
        """The final weights are written: the budget's clock stops."""
        self.stopped_at = self.used_s()

    def finish(self) -> None:
        """After the last hook: say how the budget went."""
        total = self._elapsed()
        if self.stopped_at is None:
            self.stopped_at = total
        used = self.stopped_at
        after = f"; the report after them took {total - used:.1f} s more" if total - used >= 0.05 else ""
        self.run.log.info(f"time budget {self.minutes:g} min: {self.run.state.epoch} epochs trained, final weights "
                          f"at {format_seconds(used)} ({100 * used / self.budget_s:.0f} % of the budget){after}")
        self._event(end=True, total_s=total)

    # -- the plan ----------------------------------------------------------------------------------------------

    def _estimate(self) -> Costs:
        """The cost of each part of the run: this attempt's measurements where there are any, else the saved
        ones, else guesses: an evaluation as a training batch per val batch (inference at a low threshold,
        NMS and scoring are not cheap) and the final phase as a checkpoint save (the final weights)."""
        saved, clock = self.saved_costs, self.clock
        measured = clock.measured_batches() > 0
        batch_s = clock.per_batch() if measured or saved is None else saved.batch_s
        eval_s = clock.recent_between(True)
        if eval_s is None:
            eval_s = saved.eval_s if saved is not None else clock.val_batches * batch_s
        between_s = clock.recent_between(False)
        if between_s is None:
            between_s = saved.between_s if saved is not None else 0.0
        save_s = self.run.checkpoint.mean_save_seconds() if self.run.checkpoint is not None else None
        final_s = save_s if save_s is not None else (saved.final_s if saved is not None else 0.0)
        return Costs(batch_s, eval_s, between_s, final_s)

    def _plan(self) -> None:
        run, state = self.run, self.run.state
        first, epochs = not self.measured, None
        if run.accelerator.is_main_process:
            self.costs = self._estimate()
            epochs, predicted = self.epochs, self._predicted()  # the plan is kept while it ends close enough
            if first or predicted is None or abs(predicted - self.budget_s) > TOLERANCE * self.budget_s:
                epochs = plan_epochs(self.budget_s, self.used_s(), state.epoch, state.batch_in_epoch,
                                     self.batches_per_epoch, self.costs, run.recipe.eval.freq,
                                     run.recipe.eval.compute_map)
        if run.accelerator.num_processes > 1:
            epochs = broadcast_object_list([epochs], from_process=0)[0]
        assert epochs is not None
        self.measured = True
        if epochs == self.epochs and not first:
            return
        was, self.epochs = self.epochs, epochs
        self._apply()
        predicted = self._predicted()
        change = "planned" if first else f"planned (was {was})"
        run.log.info(f"time budget {self.minutes:g} min: {epochs} epochs {change}, predicted end at "
                     f"{format_seconds(predicted)} (epoch {state.epoch + 1}, {format_seconds(self.used_s())} used)")
        if predicted is not None and predicted > self.budget_s and not self.said_short:
            self.said_short = True
            run.log.info(f"warning: the time budget is too short for the epoch in progress: it ends at about "
                         f"{format_seconds(predicted)}, over the {self.minutes:g} min")
        self._event()

    def _predicted(self) -> float | None:
        if self.costs is None:
            return None
        state, recipe = self.run.state, self.run.recipe
        return predicted_seconds(self.epochs, self.used_s(), state.epoch, state.batch_in_epoch,
                                 self.batches_per_epoch, self.costs, recipe.eval.freq, recipe.eval.compute_map)

    def _apply(self, anchor: tuple[int, float] | None = None) -> None:
        """Fit the run to ``self.epochs``: schedule (re-timed from here, or from a saved ``anchor``), stages,
        hooks, progress."""
        run = self.run
        self.anchor = set_length(run.scheduler, self.epochs * self.steps_per_epoch, run.state.schedule_step, anchor)
        stages = run.recipe.data.stages
        if stages:
            starts = stage_starts([s.epochs for s in stages], self.epochs)
            for ds in getattr(run.train_set, "datasets", [run.train_set]):  # both sets of a [data.mix]
                staged = getattr(ds, "transforms", None)
                if hasattr(staged, "set_starts"):
                    staged.set_starts(starts)
            self.stage_starts = starts
        for hook in run.hooks:
            hook.planned(self.epochs)
        self.progress.set_max_epoch(self.epochs)

    def _event(self, start: bool = False, end: bool = False, total_s: float | None = None) -> None:
        """A ``budget`` line in metrics.jsonl: the plan now (``end``: ``used_s`` to the final weights,
        ``total_s`` with the report)."""
        state = self.run.state
        predicted = self._predicted() if not end else None
        self.run.log.event({"event": "budget", "epoch": state.epoch, "step": state.global_step,
                            "epochs": self.epochs, "budget_s": self.budget_s, "used_s": round(self.used_s(), 3),
                            **({"predicted_s": round(predicted, 3)} if predicted is not None else {}),
                            **({"total_s": round(total_s, 3)} if total_s is not None else {}),
                            **({"start": True} if start else {}), **({"end": True} if end else {})})
