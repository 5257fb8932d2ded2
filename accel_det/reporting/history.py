"""A run's history as the plots need it: ``metrics.jsonl`` read back, with the events of abandoned histories
left out.

``metrics.jsonl`` is append-only, so it can hold more than the run's history: a run killed mid-epoch logged
steps past its newest checkpoint, and resumed from there it logs those steps again (a ``resume`` event marks
the point); a run killed before its first checkpoint starts over (a ``restart`` event). Read in order, a
``resume`` at step S of epoch E drops what came before it past S (training) or past E (evaluations), and a
``restart`` drops everything before it; an evaluation logged twice for one epoch (a run stopped among its
epoch-end hooks runs them again) keeps the newer one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accel_det.errors import DataError

# fields of a "train" event that are not a loss
_NOT_LOSSES = {"time", "event", "epoch", "batch", "step", "lr", "lr_bias", "momentum", "img_per_s"}


@dataclass
class History:
    train: list[dict[str, Any]] = field(default_factory=list)  # "train" events, in step order
    evals: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # split -> "eval" events, by epoch
    dropped_last_line: bool = False  # a half-written last line (the process was killed while writing it)

    def loss_keys(self) -> list[str]:
        """The losses the log holds, total first, in the order the model reports them."""
        keys: dict[str, None] = {}
        for event in self.train:
            for k, v in event.items():
                if k not in _NOT_LOSSES and isinstance(v, int | float) and not isinstance(v, bool):
                    keys[k] = None
        return sorted(keys, key=lambda k: k != "loss")

    def best(self, headline: str, split: str = "val") -> dict[str, Any] | None:
        """The evaluation "best" follows (EvalHook's rule: the first highest number >= 0)."""
        best = None
        for event in self.evals.get(split, []):
            value = event.get(headline)
            if isinstance(value, int | float) and math.isfinite(value) and value >= 0:
                if best is None or value > best[headline]:
                    best = event
        return best


def read_history(path: Path) -> History:
    """``path``: a run's metrics.jsonl. A line that is not JSON raises a ``DataError`` naming it, except a last
    line cut short by a kill, which is left out (``dropped_last_line``)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: no metrics.jsonl (has the run logged anything yet?)") from None
    events: list[dict[str, Any]] = []
    history = History()
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError as exc:
            if n == len(lines):
                history.dropped_last_line = True
                continue
            raise DataError(f"{path}:{n}: not a JSON line ({exc.msg})") from None
        if not isinstance(event, dict):
            raise DataError(f"{path}:{n}: not a JSON object")
        kind = event.get("event")
        if kind == "restart":
            events = []
        elif kind == "resume":
            step, epoch = int(event.get("step", 0)), int(event.get("epoch", 0))
            events = [e for e in events if not _after(e, step, epoch)]
        elif kind in ("train", "eval"):
            events.append(event)
    evals: dict[tuple[str, int], dict[str, Any]] = {}
    for event in events:
        if event["event"] == "train":
            history.train.append(event)
        else:
            evals[(str(event.get("split", "val")), int(event["epoch"]))] = event  # the newer one wins
    history.train.sort(key=lambda e: int(e["step"]))
    for (split, _), event in sorted(evals.items(), key=lambda kv: kv[0][1]):
        history.evals.setdefault(split, []).append(event)
    return history


def _after(event: dict[str, Any], step: int, epoch: int) -> bool:
    if event["event"] == "eval":
        return int(event["epoch"]) > epoch
    return int(event["step"]) > step
