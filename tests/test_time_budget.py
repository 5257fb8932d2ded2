"""``train.time_budget_minutes``: the recipe keys, the planner as pure functions on hand cases, the LR
schedule re-timed without a jump, a resumed plan kept, and one budgeted run of the demo recipe end to end."""

from __future__ import annotations

import itertools
import json
import math
import random
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from procs import run
from tiny_run import tiny_overrides

from accel_det.config import Recipe
from accel_det.config_io import load_recipe
from accel_det.data.dataset import StagedTransforms
from accel_det.engine.budget import Costs, TimeBudget, evaluations, plan_epochs, predicted_seconds, stage_starts
from accel_det.engine.hooks import EvalHook, Hook, TrainState
from accel_det.engine.progress import RunClock, TrainProgress
from accel_det.errors import RecipeError
from accel_det.optim import build_scheduler
from accel_det.optim.scheduler import set_length

REPO = Path(__file__).parents[1]
DEMO = REPO / "recipes" / "demo.toml"


# -- the recipe keys -----------------------------------------------------------------------------------------------


def test_max_epoch_and_budget_are_exclusive_when_both_are_set() -> None:
    with pytest.raises(RecipeError) as err:
        load_recipe(DEMO, ["train.time_budget_minutes=1"])  # demo.toml sets train.max_epoch
    msg = str(err.value)
    assert "\n" not in msg and "train.max_epoch" in msg and "train.time_budget_minutes" in msg
    assert msg.startswith(f"{DEMO}: ")
    with pytest.raises(RecipeError, match="train.max_epoch"):
        load_recipe(None, ["train.max_epoch=3", "train.time_budget_minutes=2"])
    # max_epoch's default is no choice of the recipe: a budget alone is fine
    assert load_recipe(None, ["train.time_budget_minutes=2"]).train.time_budget_minutes == 2.0


@pytest.mark.parametrize("value", ["0", "-1.5", "nan", "true", "'1'"])
def test_budget_must_be_a_positive_number(value: str) -> None:
    with pytest.raises(RecipeError, match="train.time_budget_minutes"):
        load_recipe(None, [f"train.time_budget_minutes={value}"])


def test_budget_refuses_epoch_valued_schedules() -> None:
    for overrides in (["scheduler.name='step'"], ["scheduler.name='multistep'", "scheduler.milestones=[3]"]):
        with pytest.raises(RecipeError, match=r"scheduler\.name: .*train\.time_budget_minutes.*'cosine'"):
            load_recipe(None, ["train.time_budget_minutes=1", *overrides])
    # multistep without milestones is the default scheduler and decays nowhere: allowed
    load_recipe(None, ["train.time_budget_minutes=1", "scheduler.name='multistep'"])


def test_budgeted_recipe_json_validates_again() -> None:
    """recipe.json is read back by resume, evaluate and predict: the unused max_epoch default must not be in it
    (it would then be 'set' next to the budget)."""
    recipe = load_recipe(None, ["train.time_budget_minutes=1.5"])
    dumped = recipe.model_dump(mode="json")
    assert "max_epoch" not in dumped["train"] and dumped["train"]["time_budget_minutes"] == 1.5
    assert Recipe.model_validate(dumped).train.time_budget_minutes == 1.5
    plain = load_recipe(None, []).model_dump(mode="json")
    assert plain["train"]["max_epoch"] == 30 and Recipe.model_validate(plain).train.time_budget_minutes is None


# -- the planner ---------------------------------------------------------------------------------------------------


def test_evaluations_follow_eval_freq_and_the_last_epoch() -> None:
    assert evaluations(0, 8, freq=2, compute_map=True) == 4  # after epochs 2, 4, 6 and 8
    assert evaluations(0, 9, freq=2, compute_map=True) == 5  # 2, 4, 6, 8 and the last, 9
    assert evaluations(3, 8, freq=2, compute_map=True) == 3  # 4, 6, 8
    assert evaluations(0, 8, freq=0, compute_map=True) == 1  # only the last
    assert evaluations(0, 8, freq=1, compute_map=True) == 8
    assert evaluations(0, 8, freq=2, compute_map=False) == 0
    assert evaluations(8, 8, freq=2, compute_map=True) == 0  # nothing left


def test_evaluations_match_the_eval_hook() -> None:
    for done, epochs, freq in itertools.product(range(5), range(1, 12), range(4)):
        hook = EvalHook({}, SimpleNamespace(compute_map=True, freq=freq), 1, Path("."), None)  # type: ignore[arg-type]
        hook.planned(epochs)
        assert evaluations(done, epochs, freq, True) == sum(hook.due(e) for e in range(done + 1, epochs + 1))


def test_plan_by_hand() -> None:
    costs = Costs(batch_s=1.0, eval_s=4.0, between_s=0.0, final_s=0.0)
    # 10 s per epoch; evaluations after epochs 2, 4, 6 and the last: 8 epochs = 80 + 4 x 4 = 96 s, 9 = 110 s
    assert plan_epochs(100.0, 0.0, 0, 0, 10, costs, eval_freq=2, compute_map=True) == 8
    assert predicted_seconds(8, 0.0, 0, 0, 10, costs, 2, True) == 96.0
    # the final phase counts too: 10 E + 5 <= 100
    assert plan_epochs(100.0, 0.0, 0, 0, 10, Costs(1.0, 0.0, 0.0, 5.0), eval_freq=0, compute_map=False) == 9
    # checkpoints at the other epoch ends: 10 E + 2 (E - 1) + 4 (the last, evaluated) <= 100 -> 8 (98 s)
    assert plan_epochs(100.0, 0.0, 0, 0, 10, Costs(1.0, 4.0, 2.0, 0.0), eval_freq=0, compute_map=True) == 8
    # mid-epoch: 2 epochs and 5 batches done in 30 s; each further epoch 10 s, the one in progress 5 s more
    assert plan_epochs(100.0, 30.0, 2, 5, 10, Costs(1.0, 0.0, 0.0, 0.0), eval_freq=0, compute_map=False) == 9
    # a budget too short for the epoch in progress: that epoch is finished anyway
    assert plan_epochs(5.0, 30.0, 2, 5, 10, costs, eval_freq=2, compute_map=True) == 3
    assert plan_epochs(1.0, 0.0, 0, 0, 10, costs, eval_freq=2, compute_map=True) == 1


def test_plan_is_the_last_epoch_count_that_fits() -> None:
    rng = random.Random(0)
    for _ in range(300):
        costs = Costs(rng.uniform(0.01, 2), rng.uniform(0, 30), rng.uniform(0, 5), rng.uniform(0, 20))
        per_epoch, done, freq = rng.randint(1, 20), rng.randint(0, 5), rng.randint(0, 4)
        batches, compute_map = rng.randint(0, per_epoch - 1), rng.random() < 0.8
        used, budget = rng.uniform(0, 100), rng.uniform(50, 3000)
        epochs = plan_epochs(budget, used, done, batches, per_epoch, costs, freq, compute_map)
        ends = [predicted_seconds(e, used, done, batches, per_epoch, costs, freq, compute_map)
                for e in range(done + 1, epochs + 2)]
        assert all(a < b for a, b in itertools.pairwise(ends))
        if ends[0] > budget:
            assert epochs == done + 1
        else:
            assert ends[epochs - done - 1] <= budget < ends[epochs - done]


def test_huge_budget_plans_many_epochs() -> None:
    epochs = plan_epochs(10 * 3600.0, 0.0, 0, 0, 100, Costs(1e-3, 0.5, 0.0, 1.0), eval_freq=10, compute_map=True)
    # 0.1 s per epoch + an evaluation every 10 epochs: about 0.15 s per epoch
    assert 239_000 < epochs < 241_000


def test_stages_are_fitted_to_the_planned_epochs() -> None:
    assert stage_starts([3, 1], 8) == [0, 6]
    assert stage_starts([95, 5], 8) == [0, 7]  # the closing stage keeps an epoch
    assert stage_starts([1, 1, 1], 10) == [0, 4, 7]  # ties: the earlier stage takes the extra epoch
    assert stage_starts([5, 5], 1) == [0, 1]  # fewer epochs than stages: the later one never comes
    assert stage_starts([1, 10, 1], 3) == [0, 1, 2]
    for stages, epochs in itertools.product([[1], [2, 3], [10, 1, 4], [1, 1, 1, 1]], range(1, 40)):
        starts = stage_starts(stages, epochs)
        counts = [b - a for a, b in itertools.pairwise([*starts, epochs])]
        assert starts[0] == 0 and min(counts) >= (1 if epochs >= len(stages) else 0) and sum(counts) == epochs
        assert all(abs(c - epochs * s / sum(stages)) < 1 + 1e-9 for c, s in zip(counts, stages, strict=True)) or (
            epochs < 2 * len(stages))


class _StageProbe(torch.utils.data.Dataset):
    """Says which stage's pipeline a sample of the current epoch went through."""

    def __init__(self) -> None:
        self.staged = StagedTransforms([0, 5], [lambda: 0, lambda: 1])  # type: ignore[list-item]
        self.epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> int:
        return self.staged.at(int(self.epoch[0]))()  # type: ignore[call-arg]


def test_moved_stages_reach_persistent_workers() -> None:
    probe = _StageProbe()
    loader = torch.utils.data.DataLoader(probe, batch_size=2, num_workers=1, persistent_workers=True)
    probe.epoch[0] = 3
    assert next(iter(loader)).tolist() == [0, 0]  # the workers start here
    probe.staged.set_starts([0, 2])  # a plan of fewer epochs: stage 2 from epoch 3 on
    assert next(iter(loader)).tolist() == [1, 1]
    with pytest.raises(ValueError, match="do not fit"):
        probe.staged.set_starts([0, 2, 4])


def test_last_planned_epoch_evaluates() -> None:
    hook = EvalHook({}, SimpleNamespace(compute_map=True, freq=5), 30, Path("."), None)  # type: ignore[arg-type]
    hook.planned(7)
    assert [e for e in range(1, 8) if hook.due(e)] == [5, 7]
    hook.planned(12)  # re-planned: 7 is an epoch like the others now
    assert [e for e in range(1, 13) if hook.due(e)] == [5, 10, 12]


# -- the LR schedule ------------------------------------------------------------------------------------------------


def _scheduler(**overrides: Any) -> tuple[torch.optim.Optimizer, Any, float]:
    recipe = load_recipe(None, ["scheduler.name='cosine'", "scheduler.min_lr_ratio=0.1", "scheduler.warmup_iters=3",
                                *(f"scheduler.{k}={v}" for k, v in overrides.items())])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5, momentum=0.9)
    return optimizer, build_scheduler(optimizer, recipe.scheduler, steps_per_epoch=10, max_epoch=30), 0.5


def test_set_length_keeps_the_lr_and_ends_the_schedule_at_the_new_length() -> None:
    optimizer, scheduler, base = _scheduler()
    reference = [f(s) for f in scheduler.lr_lambdas for s in range(301)]
    for _ in range(40):
        optimizer.step()
        scheduler.step()
    before = optimizer.param_groups[0]["lr"]
    anchor = set_length(scheduler, 120, 40)  # 30 epochs -> 12: the rest of the cosine in 80 steps
    assert anchor == (40, pytest.approx(40 / 300))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(before)  # no jump
    lrs = []
    for _ in range(80):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[-1] == pytest.approx(0.1 * base)  # the schedule's end, at the new length
    assert all(a > b for a, b in itertools.pairwise(lrs))
    set_length(scheduler, 200, 120)  # a later plan past the end: stays at the end
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * base)
    # the unplanned schedule is untouched by the anchor's default
    _, fresh, _ = _scheduler()
    assert [f(s) for f in fresh.lr_lambdas for s in range(301)] == reference


def test_set_length_in_warmup_and_with_a_bias_group() -> None:
    recipe = load_recipe(None, ["scheduler.name='cosine'", "scheduler.warmup_iters=10", "scheduler.warmup_bias_lr=0.1"])
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "name": "decay"},
              {"params": [torch.nn.Parameter(torch.zeros(1))], "name": "bias"}]
    optimizer = torch.optim.SGD(groups, lr=0.01, momentum=0.9)
    scheduler = build_scheduler(optimizer, recipe.scheduler, steps_per_epoch=5, max_epoch=30)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    before = [g["lr"] for g in optimizer.param_groups]
    set_length(scheduler, 20, 4)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(before)
    assert optimizer.param_groups[0]["momentum"] < 0.9  # still warming up: the momentum ramp follows the step
    for _ in range(16):
        optimizer.step()
        scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.0, 0.0], abs=1e-12)


# -- a resumed plan ------------------------------------------------------------------------------------------------


class _Log:
    main = False  # no progress bar

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.events: list[dict[str, Any]] = []

    def info(self, msg: str) -> None:
        self.lines.append(msg)

    def event(self, record: dict[str, Any], step: int | None = None) -> None:
        self.events.append(record)


class _Planned(Hook):
    def __init__(self) -> None:
        self.seen: list[int] = []

    def planned(self, max_epoch: int) -> None:
        self.seen.append(max_epoch)


def test_resumed_run_keeps_its_plan_and_counts_the_time_used() -> None:
    recipe = load_recipe(None, ["train.time_budget_minutes=2", "scheduler.name='cosine'", "scheduler.warmup_iters=0",
                                "data.stages=[{epochs = 3}, {epochs = 1}]"])
    optimizer, scheduler, _ = _scheduler(warmup_iters=0)
    saved = {"minutes": 2.0, "epochs": 8, "measured": True, "used_s": 70.0,
             "schedule": {"anchor": [20, 0.25], "steps_per_epoch": 10},
             "costs": {"batch_s": 1.0, "eval_s": 3.0, "between_s": 0.0, "final_s": 1.0}}
    state = TrainState(epoch=4, global_step=40, schedule_step=40, budget=saved)
    hook, log = _Planned(), _Log()
    run_ = SimpleNamespace(recipe=recipe, state=state, log=log, scheduler=scheduler, hooks=[hook], checkpoint=None,
                           train_loader=range(10), train_set=SimpleNamespace(),
                           accelerator=SimpleNamespace(is_main_process=True, num_processes=1))
    clock = RunClock(30, 10, lambda e: False, 2)
    budget = TimeBudget(run_, clock, TrainProgress(log, clock, 10))  # type: ignore[arg-type]
    assert budget.epochs == 8 and hook.seen == [8] and clock.max_epoch == 8
    assert budget.stage_starts == [0, 6]
    # the LR of step 40 on the saved re-timed schedule: from progress 0.25 at step 20 to 1 at step 80
    cosine = 0.5 * (1 + math.cos(math.pi * (0.25 + 20 * 0.75 / 60)))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * (0.1 + 0.9 * cosine))
    budget.before_epoch()  # nothing timed in this attempt yet: the plan stays
    assert budget.epochs == 8 and hook.seen == [8]
    record = state.to_dict()["budget"]
    assert record["epochs"] == 8 and record["used_s"] >= 70.0 and record["schedule"]["anchor"] == [20, 0.25]
    assert log.events[-1]["event"] == "budget" and log.events[-1]["start"]


def test_plans_from_the_measured_speed_and_refits_the_schedule() -> None:
    recipe = load_recipe(None, ["train.time_budget_minutes=2", "scheduler.name='cosine'", "scheduler.warmup_iters=0",
                                "data.stages=[{epochs = 1}, {epochs = 1}]", "eval.freq=10"])
    optimizer, scheduler, _ = _scheduler(warmup_iters=0)
    state, hook, log = TrainState(), _Planned(), _Log()
    run_ = SimpleNamespace(recipe=recipe, state=state, log=log, scheduler=scheduler, hooks=[hook], checkpoint=None,
                           train_loader=range(10), train_set=SimpleNamespace(),
                           accelerator=SimpleNamespace(is_main_process=True, num_processes=1))
    clock = RunClock(30, 10, lambda e: e % 10 == 0, val_batches=2)
    budget = TimeBudget(run_, clock, TrainProgress(log, clock, 10))  # type: ignore[arg-type]
    assert budget.epochs == 30 and "provisionally 30" in log.lines[-1]  # nothing timed yet
    budget.before_epoch()
    assert budget.epochs == 30

    def epoch(seconds_per_batch: float) -> None:
        for _ in range(10):
            optimizer.step()
            scheduler.step()
        clock.add_batches(10, 10 * seconds_per_batch)
        clock.end_epoch()
        state.epoch += 1
        state.global_step = state.schedule_step = 10 * state.epoch

    clock.add_batches(1, 5.0)  # the first batch (start-up): not extrapolated
    epoch(1.0)
    lr = optimizer.param_groups[0]["lr"]
    budget.before_epoch()
    # 1 s per batch, an evaluation guessed at 2 val batches x 1 s: (E - 1) x 10 s + 2 s per evaluation (epoch 10
    # and the last) <= 120 s -> E = 12 (114 s; 13 would be 124 s)
    assert budget.epochs == 12 and hook.seen[-1] == 12 and clock.max_epoch == 12
    assert scheduler.lr_lambdas[0].total_steps == 120 and optimizer.param_groups[0]["lr"] == pytest.approx(lr)
    assert budget.stage_starts == [0, 6]
    assert "12 epochs planned" in log.lines[-1] and log.events[-1]["epochs"] == 12
    n_lines = len(log.lines)
    epoch(3.0)  # slower: the median of the epochs is 2 s per batch now
    lr = optimizer.param_groups[0]["lr"]
    budget.before_epoch()
    # (E - 2) x 20 s + 2 s (the last evaluation; 10 is past the plan) <= 120 -> E = 7 (102 s; 8 would be 122 s)
    assert budget.epochs == 7 and hook.seen[-1] == 7 and budget.stage_starts == [0, 4]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lr)  # no jump
    assert "7 epochs planned (was 12)" in log.lines[n_lines]
    for _ in range(50):  # the 5 epochs left end the schedule
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5)
    assert state.to_dict()["budget"]["epochs"] == 7


# -- end to end ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_with_a_one_minute_budget(tmp_path: Path) -> None:
    """The demo recipe (its max_epoch removed: the keys are exclusive) on tiny data for 1 minute. The final
    weights are written within 10 % of the budget (the report drawn after them is outside it), the run trained
    the epochs it planned, the last one evaluated, and the LR ended at the schedule's end."""
    recipe = tmp_path / "demo_budget.toml"
    recipe.write_text("".join(line for line in DEMO.read_text().splitlines(keepends=True)
                              if not line.startswith("max_epoch")))
    overrides = [o for o in tiny_overrides(tmp_path / "runs", tmp_path / "data", **{
        "scheduler.name": "'cosine'", "scheduler.min_lr_ratio": 0.05, "eval.freq": 5, "output.checkpoint_freq": 0,
        "optimizer.lr": 3e-3,
    }) if not o.startswith("train.max_epoch=")]
    minutes = 1.0
    run([sys.executable, "-m", "accel_det.train", recipe, *overrides, f"train.time_budget_minutes={minutes}"],
        cwd=tmp_path)
    run_dir = tmp_path / "runs" / "demo" / "round1"
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    budget = [e for e in events if e["event"] == "budget"]
    start, end = budget[0], budget[-1]
    assert start.get("start") and end.get("end")
    used = end["used_s"]
    assert abs(used - 60 * minutes) <= 6 * minutes, f"{used:.1f} s used of a {60 * minutes:.0f} s budget"
    assert abs((end["time"] - start["time"]) - end["total_s"]) < 1.0  # the run's clock is the wall clock
    assert end["total_s"] >= used
    epochs = [e for e in events if e["event"] == "epoch"]
    planned = end["epochs"]
    assert [e["epoch"] for e in epochs] == list(range(1, planned + 1)) and planned > 1
    assert epochs[-1]["lr"] == pytest.approx(0.05 * 3e-3)  # AdamW at 3e-3, cosine to 5 %
    assert epochs[-2]["lr"] > epochs[-1]["lr"]
    assert (run_dir / "eval" / f"epoch_{planned:04d}.json").is_file()
    state = json.loads((run_dir / "checkpoints" / f"epoch_{planned:04d}" / "trainer_state.json").read_text())
    assert state["finished"] and state["budget"]["epochs"] == planned and state["budget"]["measured"]
    log = (run_dir / "log.txt").read_text()
    assert f"{planned} epochs planned" in log and f"epoch {planned}/{planned} done" in log
    # launched again: finished as planned, nothing to do (not 30 more epochs of max_epoch's default)
    res = run([sys.executable, "-m", "accel_det.train", recipe, *overrides, f"train.time_budget_minutes={minutes}"],
              cwd=tmp_path)
    assert "finished" in res.stdout and f"{planned} epochs planned" in res.stdout
    assert (run_dir / "metrics.jsonl").read_text().count("\n") == len(events)
