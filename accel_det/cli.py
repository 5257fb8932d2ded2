"""``accel-det``: validate | evaluate | predict."""

from __future__ import annotations

import argparse
import sys

from accel_det.config import RecipeError, load_recipe


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _validate(args: argparse.Namespace) -> int:
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(recipe.to_json())
    print(f"ok: {args.recipe} -> run dir {recipe.run_dir()}", file=sys.stderr)
    return 0


def _reference(args: argparse.Namespace) -> int:
    from accel_det.config import reference_markdown

    print(reference_markdown())
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from accel_det.evaluate import main as evaluate_main

    return evaluate_main(args)


def _predict(args: argparse.Namespace) -> int:
    from accel_det.predict import main as predict_main

    return predict_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="accel-det", description="Train object detectors with Accelerate.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a recipe (no torch import) and print it resolved")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key=value overrides (TOML values)")
    p.add_argument("-q", "--quiet", action="store_true", help="only say ok / the error")
    p.set_defaults(func=_validate)

    p = sub.add_parser("reference", help="print every recipe key as a Markdown table (README's reference)")
    p.set_defaults(func=_reference)

    p = sub.add_parser("evaluate", help="evaluate a run's checkpoint on its val split")
    p.add_argument("run_dir")
    p.add_argument("--checkpoint", default="best", help="best | last | PATH (default best, else last)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the run's recipe")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("predict", help="detect objects in images with a trained run")
    p.add_argument("run_dir")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--out", required=True, help="output folder: predictions.json + drawn PNGs")
    p.add_argument("--checkpoint", default="best", help="best | last | PATH | weights file")
    p.add_argument("--conf", type=float, default=0.3, help="score threshold for output and drawing")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.set_defaults(func=_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come after options (`evaluate RUN --checkpoint best eval.max_det=50`), which
    # argparse's positional nargs="*" does not accept: collect the leftovers that look like overrides
    args, extra = parser.parse_known_args(argv)
    bad = [e for e in extra if "=" not in e or e.startswith("-") or not hasattr(args, "overrides")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
