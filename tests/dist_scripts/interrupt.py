"""``accel_det.train`` interrupted on purpose, the ways real runs get interrupted.

    python tests/dist_scripts/interrupt.py MODE STEP RECIPE [key=value ...]   (or under torchrun)

MODE, at optimizer step STEP (after that step's hooks) on the main process:
- ``kill``: SIGKILL itself (a preempted node, the OOM killer): no handler, no cleanup, nothing flushed;
- ``term``: SIGTERM itself (what SLURM/Kubernetes send first): the run must save and exit 0;
- ``int``: SIGINT itself (Ctrl-C): the run must save and exit 130;
- ``crash_in_save``: SIGKILL in the middle of the next checkpoint save, after accelerate wrote its files into
  the temp dir and before trainer_state.json: the previous checkpoint must be the one resumed;
- ``eval_raises``: the next evaluation fails (after its epoch's checkpoint was saved).
"""

from __future__ import annotations

import os
import signal
import sys

import accel_det.engine.checkpoint as checkpoint
import accel_det.engine.evaluator as evaluator
from accel_det.config_io import load_recipe
from accel_det.engine.hooks import Hook, TrainState
from accel_det.engine.trainer import run_training
from accel_det.errors import EvaluationError, run_cli


def _main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class Interrupt(Hook):
    def __init__(self, mode: str, step: int) -> None:
        self.mode, self.step = mode, step

    def after_step(self, state: TrainState) -> None:
        if state.global_step != self.step or not _main_process():
            return
        if self.mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.mode == "term":
            os.kill(os.getpid(), signal.SIGTERM)
        elif self.mode == "int":
            os.kill(os.getpid(), signal.SIGINT)
        elif self.mode == "crash_in_save":
            write = checkpoint.write_json_atomic

            def crash_before_state(path: object, obj: object) -> None:
                # the model, optimizer and RNG files are in the temp dir; trainer_state.json never arrives
                if str(path).endswith(checkpoint.STATE_FILE) and ".tmp" in str(path):
                    os.kill(os.getpid(), signal.SIGKILL)
                write(path, obj)

            checkpoint.write_json_atomic = crash_before_state
        elif self.mode == "eval_raises":
            def fail(*args: object, **kwargs: object) -> None:
                raise EvaluationError("evaluation failed: injected")

            evaluator.evaluate = fail


if __name__ == "__main__":
    mode, step = sys.argv[1], int(sys.argv[2])
    recipe = load_recipe(sys.argv[3], sys.argv[4:])
    sys.exit(run_cli(lambda: run_training(recipe, hooks=[Interrupt(mode, step)]) and 0))
