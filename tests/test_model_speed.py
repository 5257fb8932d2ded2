"""train.channels_last and train.compile: how the model runs, never what it computes (or its state_dict)."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from accel_det.config_io import load_recipe
from accel_det.engine.model_speed import apply_memory_format, compile_model, use_channels_last
from accel_det.models import build_model


class Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, line: str) -> None:
        self.lines.append(line)


def _recipe(*overrides: str):
    return load_recipe("recipes/demo.toml", ["model.img_dim=64", *overrides])


def _conv_weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_channels_last_auto_follows_the_measured_models() -> None:
    assert use_channels_last(_recipe())  # the native SSD-lite: measured faster
    assert not use_channels_last(_recipe("train.channels_last=false"))
    tv = load_recipe("recipes/voc_retinanet_resnet50_fpn_v2.toml")
    assert not use_channels_last(tv)  # measured neutral: left alone
    assert use_channels_last(load_recipe("recipes/voc_retinanet_resnet50_fpn_v2.toml", ["train.channels_last=true"]))


def test_channels_last_model_computes_the_same_and_keeps_its_keys() -> None:
    recipe = _recipe()
    torch.manual_seed(0)
    model, _ = build_model(recipe)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        before = model.net(x)
    fast = apply_memory_format(model, recipe)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in _conv_weights(fast))
    assert fast.state_dict().keys() == reference.keys()
    assert all(torch.equal(fast.state_dict()[k], v) for k, v in reference.items())
    with torch.no_grad():
        after = fast.net(x)
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_compile_falls_back_to_eager_with_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    """A compile that fails (here: a backend that raises, as inductor does without a C++ compiler) leaves the
    model eager and the run going, with one note naming the failure."""

    def broken_compile(self: nn.Module, *args: object, **kwargs: object) -> None:
        def fail(*a: object, **k: object) -> None:
            raise RuntimeError("no C++ compiler found")

        self._compiled_call_impl = fail

    monkeypatch.setattr(nn.Module, "compile", broken_compile)
    recipe = _recipe("train.compile=true")
    model, _ = build_model(recipe)
    model.train()
    log = Lines()
    compile_model(model, recipe, log)
    assert model.training  # the dry run's eval mode is undone
    assert len(log.lines) == 1 and "training eagerly" in log.lines[0] and "no C++ compiler" in log.lines[0]
    out = model(torch.rand(2, 3, 64, 64), [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]]),
                                             "labels": torch.tensor([1])}] * 2)
    assert torch.isfinite(sum(out.values()))


@pytest.mark.slow
def test_compile_traces_the_native_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """dynamo really traces the network (backend "eager": the graph capture without inductor's C++ build, which
    takes minutes on CPU); the BatchNorm statistics do not move in the dry run."""
    monkeypatch.setattr(nn.Module, "compile", functools.partialmethod(nn.Module.compile, backend="eager"))
    torch._dynamo.reset()
    recipe = _recipe("train.compile=true")
    model, _ = build_model(recipe)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    log = Lines()
    compile_model(model, recipe, log)
    assert log.lines == [
        "train.compile: net compiled with torch.compile (the first steps compile the training graph)"
    ]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stats.items())
    assert model.net._compiled_call_impl is not None
    torch._dynamo.reset()
