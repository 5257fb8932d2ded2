"""The one error type of accel_det, and the one place that turns it into a line on stderr and an exit code.

Every expected failure (a bad recipe, bad data, an unusable checkpoint, a launch problem, ...) raises a
subclass of :class:`AccelDetError` whose message is already one line naming the file and the key or
sample. :func:`run_cli` is the wrapper every entry point uses: such an error becomes ``error: <line>`` on
stderr (once, not once per process) and exit code 2 (the user's input: recipe or command line) or 1 (a
run-time failure). Anything else is a bug in accel_det and keeps its traceback.

This module imports nothing heavy: ``accel-det validate`` raises these without importing torch.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable

# torch's DataLoader re-raises a worker's exception as ``type(msg)`` with msg = "Caught X in DataLoader
# worker process N.\nOriginal Traceback (most recent call last): ... \nmodule.X: <our line>"
_WORKER_TRACEBACK = "Original Traceback (most recent call last):"
_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*: (.*)$")


def _one_line(message: str) -> tuple[str, bool]:
    """(the message as one line, whether it came from a DataLoader worker)."""
    if _WORKER_TRACEBACK not in message:
        return message, False
    lines = [ln for ln in message.strip().splitlines() if ln.strip()]
    m = _EXC_LINE.match(lines[-1]) if lines else None
    return (m.group(1) if m else lines[-1]) if lines else message, True


class AccelDetError(Exception):
    """An expected failure, its message one line. ``exit_code`` 1: a run-time failure.

    ``local``: the error happened in this process only (a sample one process's shard reads), so every
    process that hits it must say so; otherwise (the default) all processes raise the same error and only
    the main process prints it.
    """

    exit_code = 1
    label = "error"

    def __init__(self, message: str = "", *, local: bool = False) -> None:
        line, from_worker = _one_line(str(message))
        super().__init__(line)
        self.local = local or from_worker


class RecipeError(AccelDetError, ValueError):
    """A recipe or override problem, formatted ``file: table.key: message``."""

    exit_code = 2


class UsageError(AccelDetError):
    """A bad command-line argument (not a recipe key)."""

    exit_code = 2


class DataError(AccelDetError, ValueError):
    """A problem with the data on disk, naming the file (and the object, line or sample)."""


class CheckpointError(AccelDetError):
    """A checkpoint that cannot be used (missing, partial, corrupt, or of another model/classes)."""


class WeightsError(AccelDetError, ValueError):
    """A weights file that cannot be read or does not fit the model."""


class LaunchError(AccelDetError):
    """The launcher, the machine or the run directory do not allow the run (no GPU, lock held, ...)."""


class EvaluationError(AccelDetError):
    """Evaluation could not score the predictions."""


class TrainingError(AccelDetError):
    """Training cannot go on (e.g. a non-finite loss)."""


class Stopped(AccelDetError):
    """Not a failure: the run stopped on request (SIGTERM, SIGINT) after saving where it was. Printed as
    ``stopped: ...``; ``exit_code`` 0 for SIGTERM (a requeued job resumes) and 130 for SIGINT."""

    label = "stopped"

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# the name the data readers have always raised
DatasetError = DataError


def _env_int(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def process_rank() -> int:
    """This process's rank as the launcher set it (torchrun/accelerate, MPI), before any process group."""
    return _env_int("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK") or 0


def world_size() -> int:
    """How many processes the launcher started (1 without a launcher)."""
    return _env_int("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE") or 1


# what torch's gloo/NCCL raise in a process whose peer died (the peer printed the real error)
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")


def lost_peer(exc: BaseException) -> bool:
    """Whether ``exc`` is this process noticing that another process of the run went away."""
    if world_size() < 2 or not isinstance(exc, RuntimeError):
        return False
    dist_error = getattr(sys.modules.get("torch.distributed"), "DistError", None)
    return (dist_error is not None and isinstance(exc, dist_error)) or any(s in str(exc) for s in _PEER_LOST)


def describe(exc: BaseException) -> str:
    """One line for a log: what stopped a run."""
    if isinstance(exc, AccelDetError):
        return f"{exc.label}: {exc}"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (KeyboardInterrupt)"
    if lost_peer(exc):
        return "another process of the run failed (its error is in its own output)"
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def report(exc: AccelDetError) -> int:
    """Print ``exc`` as one line (main process, or any process for a local error); return its exit code."""
    rank = process_rank()
    if rank == 0 or exc.local:
        prefix = f"[rank {rank}] " if rank else ""
        print(f"{prefix}{exc.label}: {exc}", file=sys.stderr, flush=True)
    return exc.exit_code


def run_cli(fn: Callable[[], int | None]) -> int:
    """Call ``fn`` and map the outcome to an exit code: 0, ``AccelDetError.exit_code``, 130 on Ctrl-C.

    A process that only lost contact with a failed peer says so in one line instead of a backend traceback:
    the peer printed the error that matters."""
    try:
        return int(fn() or 0)
    except AccelDetError as exc:
        return report(exc)
    except KeyboardInterrupt:
        if process_rank() == 0:
            print("interrupted", file=sys.stderr, flush=True)
        return 130
    except RuntimeError as exc:
        if not lost_peer(exc):
            raise
        print(f"[rank {process_rank()}] stopped: another process of the run failed (its error is above)",
              file=sys.stderr, flush=True)
        return 1
