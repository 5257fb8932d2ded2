"""LR schedules in optimizer steps equal hand-computed values; param groups keep decay off norms/biases."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from accel_det.config_io import load_recipe
from accel_det.optim import build_optimizer, build_scheduler, param_groups


def _lrs(overrides: list[str], steps_per_epoch: int, n: int) -> list[float]:
    r = load_recipe(None, overrides)
    opt = build_optimizer(nn.Linear(2, 2), r.optimizer)
    sched = build_scheduler(opt, r.scheduler, steps_per_epoch, r.train.max_epoch)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_multistep_hand_values() -> None:
    # base 0.1, warmup 4 steps from factor 0.2 (linear), milestones at epochs 1 and 2 = steps 5 and 10
    lrs = _lrs(["optimizer.lr=0.1", "scheduler.name='multistep'", "scheduler.milestones=[1, 2]",
                "scheduler.gamma=0.5", "scheduler.warmup_iters=4", "scheduler.warmup_factor=0.2",
                "train.max_epoch=3"], steps_per_epoch=5, n=12)
    # step k < 4: factor = 0.2 * (1 - k/4) + k/4
    expected = [0.1 * (0.2 * (1 - k / 4) + k / 4) for k in range(4)]
    expected += [0.1] * 1 + [0.05] * 5 + [0.025] * 2   # steps 4 | 5..9 | 10, 11
    assert lrs == pytest.approx(expected, rel=1e-12)


def test_constant_warmup_then_cosine() -> None:
    lrs = _lrs(["optimizer.lr=1.0", "scheduler.name='cosine'", "scheduler.warmup_iters=2",
                "scheduler.warmup_method='constant'", "scheduler.warmup_factor=0.1",
                "scheduler.min_lr_ratio=0.1", "train.max_epoch=2"], steps_per_epoch=4, n=9)
    total = 8
    cos = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(k, total) / total)) for k in range(9)]
    expected = [0.1 * cos[0], 0.1 * cos[1]] + cos[2:]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert lrs[-1] == pytest.approx(0.1)


def test_step_schedule() -> None:
    lrs = _lrs(["optimizer.lr=1.0", "scheduler.name='step'", "scheduler.step_size=2", "scheduler.gamma=0.1",
                "train.max_epoch=6"], steps_per_epoch=3, n=13)
    assert lrs == pytest.approx([1.0] * 6 + [0.1] * 6 + [0.01])


def test_no_decay_on_norm_and_bias() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    groups = param_groups(model, 5e-4, True)
    decay = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 5e-4 and groups[1]["weight_decay"] == 0.0
    assert decay == {id(model[0].weight), id(model[2].weight)}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert len(param_groups(model, 5e-4, False)) == 1


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_optimizers(name: str) -> None:
    r = load_recipe(None, [f"optimizer.name='{name}'", "optimizer.lr=0.01"])
    opt = build_optimizer(nn.Linear(2, 2), r.optimizer)
    assert opt.param_groups[0]["lr"] == 0.01
    assert type(opt) is {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]


def test_jump_to_step_equals_stepping() -> None:
    from accel_det.optim import jump_to_step

    r = load_recipe(None, ["scheduler.milestones=[1, 2]", "scheduler.warmup_iters=3", "train.max_epoch=3"])
    opt = build_optimizer(nn.Linear(2, 2), r.optimizer)
    sched = build_scheduler(opt, r.scheduler, 4, r.train.max_epoch)
    for _ in range(6):
        opt.step()
        sched.step()
    opt2 = build_optimizer(nn.Linear(2, 2), r.optimizer)
    sched2 = build_scheduler(opt2, r.scheduler, 4, r.train.max_epoch)
    jump_to_step(sched2, 6)
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())
    opt.step(); sched.step(); opt2.step(); sched2.step()  # noqa: E702
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())
