"""The model summary printed at the start of training (MindYOLO's ``summary``): parameters per top-level
module, the trainable count, the optimizer's param groups and the input size, as one rich table.

"Top-level" skips wrappers that only hold one parameterised child (DDP, torch.compile, a native
detector's ``net`` beside its parameter-free priors/criterion/postprocess): the rows are the parts one
would freeze or swap (``net.backbone``, ``net.loc``, ...), not a single ``net`` row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.table import Table
from torch import nn


@dataclass
class ParamGroupCount:
    name: str
    tensors: int
    parameters: int
    weight_decay: float


@dataclass
class ModelCounts:
    modules: list[tuple[str, int, int]] = field(default_factory=list)  # (name, parameters, trainable)
    total: int = 0
    trainable: int = 0
    groups: list[ParamGroupCount] = field(default_factory=list)


def _numel(params: Any) -> tuple[int, int]:
    ps = list(params)
    return sum(p.numel() for p in ps), sum(p.numel() for p in ps if p.requires_grad)


def _top(model: nn.Module) -> tuple[nn.Module, str]:
    """(the module whose children are the rows, their name prefix)."""
    prefix = ""
    while True:
        owned = [(n, c) for n, c in model.named_children() if any(True for _ in c.parameters())]
        own = any(True for _ in model.parameters(recurse=False))
        if len(owned) != 1 or own:
            return model, prefix
        name, model = owned[0]
        # DDP's ``module`` and torch.compile's ``_orig_mod`` are wrappers, not parts of the model
        prefix = prefix if name in ("module", "_orig_mod") else f"{prefix}{name}."


def count_parameters(model: nn.Module, optimizer: Any = None) -> ModelCounts:
    """The numbers behind :func:`model_summary` (shared parameters counted once)."""
    counts = ModelCounts()
    counts.total, counts.trainable = _numel({id(p): p for p in model.parameters()}.values())
    top, prefix = _top(model)
    seen: set[int] = set()
    own = list(top.parameters(recurse=False))
    rows = [(f"{prefix}(own)", own)] if own else []
    rows += [(f"{prefix}{n}", list(c.parameters())) for n, c in top.named_children()]
    for name, params in rows:
        fresh = [p for p in params if id(p) not in seen]
        seen.update(id(p) for p in fresh)
        if fresh:
            counts.modules.append((name, *_numel(fresh)))
    if optimizer is not None:
        for i, g in enumerate(optimizer.param_groups):
            n, _ = _numel(g["params"])
            counts.groups.append(
                ParamGroupCount(str(g.get("name", f"group{i}")), len(g["params"]), n, float(g.get("weight_decay", 0)))
            )
    return counts


def model_summary(model: nn.Module, optimizer: Any, img_dim: int) -> Table:
    """A rich table of ``model`` (the unwrapped or prepared one), ``optimizer``'s groups (or None) and the
    input size; print it with ``rich.console.Console().print`` (main process only)."""
    counts = count_parameters(model, optimizer)
    bare = model
    while (inner := getattr(bare, "_orig_mod", None) or getattr(bare, "module", None)) is not None:
        bare = inner  # DDP / torch.compile wrappers
    channels = getattr(bare, "channels", 3)
    table = Table(title=f"model: {counts.total:,} parameters, {counts.trainable:,} trainable", title_justify="left")
    table.add_column("part")
    table.add_column("parameters", justify="right")
    table.add_column("trainable", justify="right")
    table.add_column("note")
    for name, n, t in counts.modules:
        table.add_row(name, f"{n:,}", f"{t:,}", "" if t == n else "partly frozen" if t else "frozen")
    table.add_section()
    table.add_row("total", f"{counts.total:,}", f"{counts.trainable:,}", "")
    if counts.groups:
        table.add_section()
        for g in counts.groups:
            note = f"{g.tensors} tensors, weight_decay {g.weight_decay:g}"
            table.add_row(f"param group {g.name}", f"{g.parameters:,}", "", note)
    table.add_section()
    table.add_row("input", "", "", f"{channels} x {img_dim} x {img_dim} per image")
    return table
