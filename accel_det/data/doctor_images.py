"""The data doctor's full decode of every image, in parallel worker processes, in a deterministic order."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import repeat

from accel_det.errors import DataError

from .images import UNREADABLE_ERRORS, EmbeddedImage, load_image, open_image

Progress = Callable[[str, int, int], None]  # (split, images done, images in the split)
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class ImageCheck:
    """What a full decode of one image found. ``error``: the one-line DataError training would hit."""

    error: str | None = None
    mode: str = ""
    orientation: int = 1
    width: int = 0
    height: int = 0


def check_image(path: str | EmbeddedImage, channels: int) -> ImageCheck:
    """Decode ``path`` (a file, or an image inside a dataset file) fully, as training will (runs in the worker
    processes)."""
    try:
        pixels = load_image(path, channels)
        # the header again, for what load_image changed; cheap after a full decode, and it cannot be read
        # differently than a moment ago unless the file changes under us, which is then worth reporting
        with open_image(path) as img:
            mode, orientation = img.mode, img.getexif().get(_EXIF_ORIENTATION, 1)
    except DataError as exc:
        return ImageCheck(error=str(exc))
    except UNREADABLE_ERRORS as exc:
        return ImageCheck(error=f"{path}: cannot read image: {exc}")
    h, w = pixels.shape[-2:]
    return ImageCheck(None, mode, orientation if isinstance(orientation, int) else 1, int(w), int(h))


def default_workers() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(4, cpus)


def make_pool(workers: int) -> ProcessPoolExecutor:
    # fork on Linux: the workers start with this process's imports (torch included) instead of importing them
    # again each, which takes seconds; macOS forks badly (system frameworks) and keeps its default.
    context = multiprocessing.get_context("fork") if sys.platform == "linux" else None
    return ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_ignore_sigint)


def _ignore_sigint() -> None:
    # Ctrl-C reaches the whole process group: the main process stops and cancels the rest; workers that took
    # it too would each print a KeyboardInterrupt traceback over the terminal
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def decode_all(
    pool: ProcessPoolExecutor | None, workers: int, paths: list[str | EmbeddedImage], channels: int, split: str,
    progress: Progress | None,
) -> list[ImageCheck]:
    """``check_image`` of every path, in order (``pool.map`` yields in submission order: a deterministic
    report whatever the worker count). ``progress`` starts after the pool has forked, so a display thread
    never exists at fork time."""
    if pool is None:
        results = map(check_image, paths, repeat(channels))
    else:
        chunk = max(1, min(64, len(paths) // (workers * 4)))
        results = pool.map(check_image, paths, repeat(channels), chunksize=chunk)
    checks: list[ImageCheck] = []
    if progress is not None:
        progress(split, 0, len(paths))
    for check in results:
        checks.append(check)
        if progress is not None:
            progress(split, len(checks), len(paths))
    return checks
