"""``accel-det check-data RECIPE [key=value ...] [--json] [--workers N]`` (also ``python -m
accel_det.check_data``): the data doctor.

Indexes the recipe's train and val splits as training would, decodes every image fully in parallel, and
prints one table of what is wrong, grouped by problem: how many, how bad (fatal: the run cannot start or will
stop; skipped: data left out; fixed: repaired at load time; info: nothing lost), what training does about it,
and the first files. ``--json`` prints one JSON object instead (every file of every finding). Exit code 0
when training can proceed, 1 when it cannot, 2 for a bad recipe or argument (data/doctor.py does the scan).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from accel_det.errors import UsageError, run_cli

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

    from accel_det.data.doctor import DoctorReport

SEVERITY_STYLE = {"fatal": "bold red", "skipped": "yellow", "fixed": "green", "info": "dim"}
FIRST_FILES = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (TOML values)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    # checked in run(): a bad value is one line like every other error, not argparse's usage
    parser.add_argument("--workers", type=int, default=None,
                        help="processes decoding images (default min(4, CPUs); 0: in this process)")


class _Bar:
    """A rich progress bar per split, started at the first image (the decoding processes are forked by then:
    no display thread exists at fork time)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress: Progress | None = None
        self.tasks: dict[str, Any] = {}

    def __call__(self, split: str, done: int, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        if self.progress is None:
            self.progress = Progress(TextColumn("decoding {task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), console=self.console, transient=True)  # fmt: skip
            self.progress.start()
        if split not in self.tasks:
            self.tasks[split] = self.progress.add_task(split, total=total)
        self.progress.update(self.tasks[split], completed=done)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def _short(path: str, root: Path) -> str:
    """``path`` relative to the data root when under it: the table stays readable; --json has full paths."""
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return path


def print_report(console: Console, report: DoctorReport, root: Path) -> None:
    from rich.table import Table
    from rich.text import Text

    if report.findings:
        table = Table(title=f"data doctor (data.root {root})", title_justify="left")
        for name, justify in (("problem", "left"), ("split", "left"), ("severity", "left"), ("count", "right"),
                              ("training does", "left"), ("first files", "left")):  # fmt: skip
            table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
        for f in report.findings:
            files = ", ".join(_short(p, root) for p in f.files[:FIRST_FILES])
            if len(f.files) > FIRST_FILES:
                files += f" and {len(f.files) - FIRST_FILES} more"
            if f.severity == "fatal":  # what is wrong matters more than where: e.g. which class names
                files = _short(f.details[0], root) if f.details else files
            table.add_row(Text(f.description), f.split, Text(f.severity, style=SEVERITY_STYLE[f.severity]),
                          str(f.count), Text(f.action), Text(files))  # fmt: skip
        console.print(table)
    for name, s in report.splits.items():
        counts = ", ".join(f"{n} {sev}" for sev, n in s.severities.items())
        console.print(Text(f"{name} ({s.format}, {s.source}): images {s.images}, readable {s.readable}, "
                           f"objects {s.objects}; problems: {counts}"))  # fmt: skip
    if report.can_train:
        console.print(Text("ok: training can proceed", style="green"))
    else:
        n = report.counts()["fatal"]
        console.print(Text(f"training cannot proceed: {n} fatal problem(s) above", style="bold red"))
        if report.on_bad_sample == "error":
            console.print(Text('(data.on_bad_sample = "error": whatever "skip" would drop or replace stops the run)'))


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from accel_det.config_io import load_recipe
    from accel_det.data.doctor import check_data

    if args.workers is not None and args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    recipe = load_recipe(args.recipe, args.overrides)
    # a pipe gets a wide table: rich's 80 columns would fold every path
    wide = sys.stdout.isatty() or "COLUMNS" in os.environ
    console = Console(highlight=False, width=None if wide else 200)
    bar = _Bar(console) if not args.json and console.is_terminal else None
    try:
        report = check_data(recipe, args.workers, progress=bar)
    finally:
        if bar is not None:
            bar.stop()
    if args.json:
        print(json.dumps(report.to_json(str(args.recipe)), indent=2))
    else:
        print_report(console, report, Path(recipe.data.root))
    return 0 if report.can_train else 1


def main(argv: list[str] | None = None) -> int:
    from accel_det.cli_args import parse_with_overrides

    parser = argparse.ArgumentParser(prog="accel_det.check_data", description=__doc__)
    add_arguments(parser)
    args = parse_with_overrides(parser, argv)
    return run_cli(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
