"""Stopping on SIGTERM (SLURM, Kubernetes: "you will be killed soon") and SIGINT (Ctrl-C) without losing work.

During training the handlers only raise a flag. The loop stops at an optimizer-step boundary that every
process agrees on, saves a checkpoint there, and exits 0 for SIGTERM (a requeued job resumes from it) or 130
for SIGINT. A second Ctrl-C interrupts at once. Before training starts (data generation, indexing) there is
nothing to save: SIGTERM then raises, so that cleanup code (a half-written synthetic dataset) runs.

Agreeing matters: processes receive a signal at slightly different times, and one that stopped a step early
would leave the others waiting in a collective forever. With one process the flag is read every step; with
several it is combined (a max over processes) where the loop already synchronises, at each log line, and
acted upon at the next optimizer step.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import torch
from accelerate import Accelerator

from accel_det.errors import Stopped

EXIT_CODES = {signal.SIGTERM: 0, signal.SIGINT: 130}


@contextmanager
def terminate_raises() -> Iterator[None]:
    """SIGTERM raises ``Stopped`` (exit 0) while the block runs: before training there is nothing to save."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Stopped("terminated (SIGTERM) before training started: nothing to save yet", exit_code=0)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class StopRequest:
    """The flag the handlers raise, and the processes' agreement on it (see the module docstring)."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self.received: int | None = None  # the signal this process got
        self.agreed: int | None = None  # the signal every process acts upon
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in EXIT_CODES:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: no patience for a checkpoint
        if self.received is None:
            self.received = signum

    def sync(self) -> None:
        """Where the processes already synchronise (a log line; a collective with several): agree on the flag."""
        if self.accelerator.num_processes == 1:
            self.agreed = self.received
            return
        mine = torch.tensor([self.received or 0], device=self.accelerator.device, dtype=torch.int64)
        # SIGTERM (15) outranks SIGINT (2): the scheduler's kill is coming whatever the user typed
        self.agreed = int(self.accelerator.reduce(mine, "max").item()) or None

    def should_stop(self) -> bool:
        """At an optimizer-step boundary: stop here? (one process: the flag of now; several: the last sync)"""
        if self.accelerator.num_processes == 1:
            self.agreed = self.received
        return self.agreed is not None

    def stopped(self, checkpoint: str) -> Stopped:
        sig = signal.Signals(self.agreed or signal.SIGTERM)
        return Stopped(f"{sig.name}: saved checkpoint {checkpoint}; the same command resumes from it",
                       exit_code=EXIT_CODES[sig])
