"""Command-line parsing shared by ``accel-det`` and the ``python -m accel_det.<command>`` entry points (kept out of
cli.py, which imports every entry point: they import this, not it)."""

from __future__ import annotations

import argparse


def parse_with_overrides(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parse_args``, except that key=value overrides may also come after options
    (``evaluate RUN --checkpoint best eval.max_det=50``), which argparse's positional nargs="*" refuses."""
    args, extra = parser.parse_known_args(argv)
    bad = [e for e in extra if "=" not in e or e.startswith("-") or not hasattr(args, "overrides")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args
