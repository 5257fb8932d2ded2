"""``accel-det``: train | validate | reference | evaluate | predict | check-data | export | report. Every subcommand
goes through ``errors.run_cli``: an expected failure is one line on stderr and exit code 2 (recipe, usage) or 1 (run
time)."""

from __future__ import annotations

import argparse
import sys

from accel_det.cli_args import parse_with_overrides
from accel_det.errors import RecipeError, run_cli


def _validate(args: argparse.Namespace) -> int:
    from accel_det.config_io import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    # a tracker whose package is missing would be dropped without a word at run time
    from accel_det.trackers import missing_tracker_packages

    problems = missing_tracker_packages(recipe.log.trackers)
    if problems:
        raise RecipeError(f"{args.recipe}: {problems[0]}")
    if not args.quiet:
        print(recipe.to_json())
    print(f"ok: {args.recipe} -> run dir {recipe.run_dir()}", file=sys.stderr)
    return 0


def _reference(args: argparse.Namespace) -> int:
    from accel_det.config_io import reference_markdown

    print(reference_markdown())
    return 0


def _train(args: argparse.Namespace) -> int:
    from accel_det.train import run

    return run(args)


def _evaluate(args: argparse.Namespace) -> int:
    from accel_det.evaluate import run

    return run(args)


def _predict(args: argparse.Namespace) -> int:
    from accel_det.predict import run

    return run(args)


def _check_data(args: argparse.Namespace) -> int:
    from accel_det.check_data import run

    return run(args)


def _export(args: argparse.Namespace) -> int:
    from accel_det.export import run

    return run(args)


def _report(args: argparse.Namespace) -> int:
    from accel_det.report import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    # the entry modules' argument definitions are imported without torch: they import it inside run()
    from accel_det import check_data, evaluate, export, predict, report, train

    parser = argparse.ArgumentParser(prog="accel-det", description="Train object detectors with Accelerate.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train from a recipe (single process; use `accelerate launch -m "
                       "accel_det.train` for several)")
    train.add_arguments(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("validate", help="check a recipe (no torch import) and print it resolved")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key=value overrides (TOML values)")
    p.add_argument("-q", "--quiet", action="store_true", help="only say ok / the error")
    p.set_defaults(func=_validate)

    p = sub.add_parser("reference", help="print every recipe key as a Markdown table (README's reference)")
    p.set_defaults(func=_reference)

    p = sub.add_parser("evaluate", help="evaluate a run's checkpoint on its val split")
    evaluate.add_arguments(p)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("predict", help="detect objects in images with a trained run")
    predict.add_arguments(p)
    p.set_defaults(func=_predict)

    p = sub.add_parser("check-data", help="scan a recipe's data for bad samples before training (the data doctor)")
    check_data.add_arguments(p)
    p.set_defaults(func=_check_data)

    p = sub.add_parser("export", help="export a run's detector to ONNX or .pt2 (decode + NMS inside), checked "
                       "against the eager model")
    export.add_arguments(p)
    p.set_defaults(func=_export)

    p = sub.add_parser("report", help="plots (results, PR curves, confusion matrix, labels, predictions) and "
                       "report.html of a run")
    report.add_arguments(p)
    p.set_defaults(func=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse_with_overrides(build_parser(), argv)
    return run_cli(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
