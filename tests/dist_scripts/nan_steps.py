"""``accel_det.train`` with non-finite losses injected, and a record of which optimizer steps moved the weights.

    python tests/dist_scripts/nan_steps.py RANK FIRST LAST RECORD.json RECIPE [key=value ...]  (or under torchrun)

Training micro-batches FIRST..LAST (1-based, counted per process) of process RANK get a NaN loss. RECORD.json
(written by the main process) lists, for every call of the trainer's ``train_step``: whether it changed the
weights, and what it reported as skipped.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

import accel_det.engine.trainer as trainer
from accel_det.config_io import load_recipe
from accel_det.errors import run_cli
from accel_det.models.native import AnchorDetector

rank, first, last, record = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
me = int(os.environ.get("RANK", "0"))
calls = 0
steps: list[dict] = []
forward, train_step = AnchorDetector.forward, trainer.train_step


def poisoned_forward(self: AnchorDetector, images: torch.Tensor, targets: object = None) -> object:
    global calls
    out = forward(self, images, targets)
    if self.training:
        calls += 1
        if me == rank and first <= calls <= last:
            out = {k: v * float("nan") for k, v in out.items()}
    return out


def recorded_step(accelerator: object, model: torch.nn.Module, *args: object, **kwargs: object) -> object:
    before = [p.detach().clone() for p in model.parameters()]
    losses, skipped = train_step(accelerator, model, *args, **kwargs)
    moved = any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    steps.append({"moved": moved, "skipped": skipped})
    if me == 0:
        record.write_text(json.dumps(steps))
    return losses, skipped


AnchorDetector.forward = poisoned_forward
trainer.train_step = recorded_step

if __name__ == "__main__":
    recipe = load_recipe(sys.argv[5], sys.argv[6:])
    sys.exit(run_cli(lambda: trainer.run_training(recipe) and 0))
