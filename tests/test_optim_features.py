"""Training features of issue 16 as building blocks: EMA of the weights, warmup momentum and bias LR,
the fp16 loss scale, and the model summary (recompute and SyncBN: test_native_models.py)."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from rich.console import Console
from torch import nn

from accel_det.config_io import load_recipe
from accel_det.engine.summary import count_parameters, model_summary
from accel_det.optim import (
    ModelEMA,
    build_optimizer,
    build_scheduler,
    current_momentum,
    grad_scaler_kwargs,
    group_lrs,
    jump_to_step,
    param_groups,
)

# ------------------------------------------------------------------------------------------------- EMA


def toy() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def train_steps(model: nn.Module, ema: ModelEMA | None, k: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """k SGD steps (BN in train mode: its running stats move too); the model's state after each."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    states = []
    for _ in range(k):
        x = torch.randn(16, 3, generator=g)
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if ema is not None:
            ema.update(model)
        states.append({n: t.detach().clone() for n, t in model.state_dict().items()})
    return states


@pytest.mark.parametrize(("decay", "warmup"), [(0.9, 3.0), (0.5, 0.0)])
def test_ema_equals_hand_computed_average(decay: float, warmup: float) -> None:
    model = toy()
    model.train()
    ema = ModelEMA(model, decay=decay, warmup=warmup)
    # ema_0 = the weights it was built from; ema_k = d_k ema_{k-1} + (1 - d_k) w_k, in float64
    hand = {n: t.detach().double().clone() for n, t in model.state_dict().items()}
    states = train_steps(model, ema, 5)
    for k, state in enumerate(states, start=1):
        d = decay * (1 - math.exp(-k / warmup)) if warmup else decay
        for n, t in state.items():
            hand[n] = d * hand[n] + (1 - d) * t.double() if t.is_floating_point() else t.clone()
    assert ema.updates == 5
    got = ema.module.state_dict()
    assert got.keys() == hand.keys()
    for n, t in got.items():
        if t.is_floating_point():
            torch.testing.assert_close(t.double(), hand[n], rtol=1e-6, atol=1e-7, msg=n)
        else:  # BN's num_batches_tracked is a count: it follows the model
            assert torch.equal(t, hand[n]) and int(t) == 5, n
    # BN running stats are averaged as well, not left at init
    assert not torch.equal(got["1.running_mean"], torch.zeros(8))
    assert not torch.equal(got["1.running_mean"], model.state_dict()["1.running_mean"])


def test_ema_state_dict_round_trip_continues_exactly() -> None:
    model = toy()
    ema = ModelEMA(model, decay=0.9, warmup=4.0)
    train_steps(model, ema, 3)
    saved = copy.deepcopy(ema.state_dict())
    assert int(saved["n_averaged"]) == 4  # the build (a copy) + 3 updates

    resumed = ModelEMA(toy(), decay=0.9, warmup=4.0)  # as a resumed run: built from fresh weights, then loaded
    resumed.load_state_dict(saved)
    assert resumed.updates == 3
    twin = copy.deepcopy(model)
    train_steps(model, ema, 2, seed=7)
    train_steps(twin, resumed, 2, seed=7)
    assert resumed.updates == ema.updates == 5
    for (n, a), b in zip(ema.module.state_dict().items(), resumed.module.state_dict().values(), strict=True):
        assert torch.equal(a, b), n


def test_ema_module_is_a_frozen_eval_copy_even_with_a_patched_forward() -> None:
    model = toy()
    # accelerate's mixed precision sets an instance forward; one branch is a closure over the original's
    original = model.forward
    model.forward = functools.wraps(original)(lambda *a, **k: original(*a, **k))
    ema = ModelEMA(model)
    assert not ema.module.training
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    x = torch.randn(4, 3)
    model.eval()
    assert torch.equal(model(x), torch.zeros(4, 2))
    assert not torch.equal(ema.module(x), torch.zeros(4, 2))  # its own weights, not the live model's


# ------------------------------------------------------------------------------- warmup momentum, bias LR

BASE = ["optimizer.lr=0.1", "optimizer.momentum=0.9", "scheduler.name='multistep'", "scheduler.milestones=[1]",
        "scheduler.gamma=0.5", "scheduler.warmup_iters=4", "scheduler.warmup_factor=0.2",
        "scheduler.warmup_momentum=0.6", "train.max_epoch=2"]
SPE = 5  # optimizer steps per epoch: the milestone is step 5


def biased() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


def hand(k: int, bias_lr: float) -> tuple[float, float, float]:
    """(LR of the weights, LR of the biases, momentum) at step k, from the recipe above."""
    main = 0.5 if k >= SPE else 1.0
    a = min(k / 4, 1.0)
    lr = 0.1 * main * (0.2 * (1 - a) + a)
    bias = bias_lr * (1 - a) + 0.1 * main * a if bias_lr else lr
    return lr, bias, 0.6 * (1 - a) + 0.9 * a


def build(overrides: list[str]) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    r = load_recipe(None, BASE + overrides)
    opt = build_optimizer(biased(), r.optimizer, bias_group=r.scheduler.warmup_bias_lr > 0)
    return opt, build_scheduler(opt, r.scheduler, SPE, r.train.max_epoch)


@pytest.mark.parametrize("bias_lr", [0.0, 0.5])
def test_lr_bias_lr_and_momentum_at_each_step(bias_lr: float) -> None:
    opt, sched = build([f"scheduler.warmup_bias_lr={bias_lr}"])
    names = [g["name"] for g in opt.param_groups]
    assert names == (["decay", "no_decay", "bias"] if bias_lr else ["decay", "no_decay"])
    for k in range(8):
        lr, bias, momentum = hand(k, bias_lr)
        lrs = group_lrs(opt)
        assert lrs["decay"] == pytest.approx(lr, rel=1e-12) and lrs["no_decay"] == pytest.approx(lr, rel=1e-12)
        if bias_lr:
            assert lrs["bias"] == pytest.approx(bias, rel=1e-12), k
        assert [g["momentum"] for g in opt.param_groups] == pytest.approx([momentum] * len(names), rel=1e-12), k
        assert current_momentum(opt) == pytest.approx(momentum, rel=1e-12)
        opt.step()
        sched.step()
    assert hand(4, bias_lr)[2] == 0.9 and hand(4, 0.5)[1] == pytest.approx(0.1)  # warmup over at step 4


def test_jump_to_step_sets_lr_and_momentum() -> None:
    for k in (0, 2, 3, 4, 6):
        opt, sched = build(["scheduler.warmup_bias_lr=0.5"])
        for g in opt.param_groups:  # an optimizer state loaded from a checkpoint of another step
            g["momentum"], g["lr"] = 0.123, 9.0
        jump_to_step(sched, k)
        lr, bias, momentum = hand(k, 0.5)
        assert group_lrs(opt) == pytest.approx({"decay": lr, "no_decay": lr, "bias": bias}, rel=1e-12), k
        assert current_momentum(opt) == pytest.approx(momentum, rel=1e-12), k
        opt.step()
        sched.step()
        lr, bias, momentum = hand(k + 1, 0.5)
        assert group_lrs(opt)["bias"] == pytest.approx(bias, rel=1e-12) and current_momentum(opt) == pytest.approx(
            momentum, rel=1e-12)


def test_adam_beta1_ramps_and_beta2_stays() -> None:
    opt, sched = build(["optimizer.name='adamw'", "optimizer.betas=[0.9, 0.99]"])
    for k in range(6):
        assert opt.param_groups[0]["betas"] == pytest.approx((hand(k, 0)[2], 0.99), rel=1e-12)
        opt.step()
        sched.step()


def test_momentum_off_stays_off_and_bias_group_is_required() -> None:
    opt, sched = build(["optimizer.momentum=0"])
    for _ in range(3):
        assert current_momentum(opt) == 0.0
        opt.step()
        sched.step()
    r = load_recipe(None, [*BASE, "scheduler.warmup_bias_lr=0.5"])
    with pytest.raises(ValueError, match="bias_group=True"):
        build_scheduler(build_optimizer(biased(), r.optimizer), r.scheduler, SPE, 2)


def test_bias_group_takes_every_bias() -> None:
    model = biased()
    groups = {g["name"]: g for g in param_groups(model, 5e-4, True, bias_group=True)}
    assert {id(p) for p in groups["bias"]["params"]} == {id(model[0].bias), id(model[1].bias), id(model[3].bias)}
    assert {id(p) for p in groups["no_decay"]["params"]} == {id(model[1].weight)}
    assert groups["bias"]["weight_decay"] == 0.0
    # without no_decay_norm_bias the biases keep the weight decay, in their own group
    groups = {g["name"]: g for g in param_groups(model, 5e-4, False, bias_group=True)}
    assert set(groups) == {"decay", "bias"} and groups["bias"]["weight_decay"] == 5e-4


# ---------------------------------------------------------------------------------------------- loss scale


def test_loss_scale_kwargs() -> None:
    r = load_recipe(None, ["train.loss_scale={init = 1024, growth_interval = 100}"])
    kw = grad_scaler_kwargs(r.train.loss_scale)
    assert (kw.init_scale, kw.growth_interval) == (1024.0, 100)
    assert kw.to_kwargs() == {"init_scale": 1024.0, "growth_interval": 100}  # what accelerate passes on
    scaler = torch.amp.GradScaler("cpu", **kw.to_kwargs())
    assert scaler.get_scale() == 1024.0
    default = grad_scaler_kwargs(load_recipe(None).train.loss_scale)
    assert (default.init_scale, default.growth_interval) == (65536.0, 2000)


# ------------------------------------------------------------------------------------------------- summary


@pytest.mark.parametrize("name", ["ssdlite_mobilenet_v3", "faceboxes", "tv_ssdlite320_mobilenet_v3_large"])
def test_model_summary_counts_add_up(name: str) -> None:
    from accel_det.models import build_model

    r = load_recipe(None, [f"model.name='{name}'", "model.img_dim=128", "scheduler.warmup_iters=5",
                           "scheduler.warmup_bias_lr=0.1"])
    model, _ = build_model(r)
    first = next(iter(model.named_children()))[0] if name.startswith("tv_") else "net"
    frozen = getattr(model, first)
    frozen = frozen.backbone if hasattr(frozen, "backbone") else next(iter(frozen.children()))
    frozen.requires_grad_(False)
    opt = build_optimizer(model, r.optimizer, bias_group=True)
    counts = count_parameters(model, opt)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) < counts.total
    assert sum(n for _, n, _ in counts.modules) == counts.total
    assert sum(t for _, _, t in counts.modules) == counts.trainable
    assert sum(g.parameters for g in counts.groups) == counts.trainable
    assert [g.name for g in counts.groups] == ["decay", "no_decay", "bias"]
    if not name.startswith("tv_"):
        assert [m for m, _, _ in counts.modules][0].startswith("net.")  # the detector's wrapper is skipped
    console = Console(record=True, width=160)
    console.print(model_summary(model, opt, 128))
    text = console.export_text()
    assert f"{counts.total:,}" in text and f"{counts.trainable:,}" in text and "frozen" in text
    assert "param group bias" in text and "3 x 128 x 128" in text
    # a DDP-like wrapper adds no row prefix
    wrapper = nn.Module()
    wrapper.module = model
    assert count_parameters(wrapper).modules == count_parameters(model).modules
