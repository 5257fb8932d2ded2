"""``accel_det.train`` with a hook that makes one process fail at a chosen optimizer step.

    torchrun --nproc_per_node 2 tests/dist_scripts/raise_on_rank.py RANK STEP RECIPE [key=value ...]

The other process is then waiting in a collective that will never complete: the test checks that both exit
non-zero within seconds (the launcher tears the group down), and that the error is printed once.
"""

from __future__ import annotations

import os
import sys

from accel_det.config_io import load_recipe
from accel_det.engine.hooks import Hook, TrainState
from accel_det.engine.trainer import run_training
from accel_det.errors import DataError, run_cli


class RaiseOnRank(Hook):
    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def after_step(self, state: TrainState) -> None:
        if int(os.environ.get("RANK", "0")) == self.rank and state.global_step == self.step:
            raise DataError(f"injected failure on rank {self.rank} at step {self.step}", local=True)


if __name__ == "__main__":
    rank, step = int(sys.argv[1]), int(sys.argv[2])
    recipe = load_recipe(sys.argv[3], sys.argv[4:])
    sys.exit(run_cli(lambda: run_training(recipe, hooks=[RaiseOnRank(rank, step)]) and 0))
