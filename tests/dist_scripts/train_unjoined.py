"""``accel_det.train`` in a process whose Accelerator does not join the launcher's process group.

    accelerate launch --multi_gpu --num_processes 2 tests/dist_scripts/train_unjoined.py MODE RECIPE [k=v ...]

This is the silent-duplication trap of a CPU machine: the launcher starts 2 processes (WORLD_SIZE=2) but
each one's Accelerator ends up non-distributed, so both would train alone into the same run dir.
build_accelerator asks for ``cpu=True`` to avoid it; the two MODEs are the two ways it still happens, and
the test asserts that the LaunchError guard stops both processes before anything is written.

- ``early_state``: some code created accelerate's (singleton) ``PartialState()`` before build_accelerator:
  on a machine without CUDA it is non-distributed, and a later ``Accelerator(cpu=True)`` silently reuses it.
- ``no_cpu_flag``: the Accelerator is built without ``cpu=True`` (what accelerate's own examples do).
"""

from __future__ import annotations

import sys

import accelerate

import accel_det.engine.distributed as distributed
from accel_det.train import main


class _AcceleratorWithoutCpuFlag(accelerate.Accelerator):
    def __init__(self, *args, cpu: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "early_state":
        accelerate.PartialState()
    elif mode == "no_cpu_flag":
        distributed.Accelerator = _AcceleratorWithoutCpuFlag
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    sys.exit(main(sys.argv[2:]))
