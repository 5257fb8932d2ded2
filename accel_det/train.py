"""``accelerate launch -m accel_det.train recipe.toml [key=value ...]`` (or ``python -m accel_det.train``,
``accel-det train``)."""

from __future__ import annotations

import argparse
import sys

from accel_det.errors import run_cli


def tune_malloc() -> None:
    """Keep glibc from unmapping and re-faulting the large activation buffers every step.

    By default glibc serves big allocations with mmap and returns them on free, so each training step pays
    page faults for the same buffers again; measured on the CPU demo this cost more than the whole
    Accelerate overhead. Raising the mmap/trim thresholds keeps them in the heap. No-op off glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)  # glibc's maximum on 64-bit
    mallopt(M_TRIM_THRESHOLD, 1024 * 1024 * 1024)
    mallopt(M_TOP_PAD, 64 * 1024 * 1024)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="TOML recipe")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, values parsed as TOML")


def run(args: argparse.Namespace) -> int:
    from accel_det.config_io import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)  # before torch is imported: a bad recipe fails fast
    tune_malloc()
    from accel_det.engine.trainer import run_training

    run_training(recipe)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="accel_det.train", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_cli(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
