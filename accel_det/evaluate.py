"""``accel-det evaluate RUN_DIR [--checkpoint best|last|PATH] [key=value ...]`` (also ``python -m
accel_det.evaluate`` and ``accelerate launch -m accel_det.evaluate``).

Opens the run (engine/run.py), builds only its val split, scores the weights with the recipe's metric and
writes ``eval/evaluate_<what>.json`` (+ COCO-format predictions), where <what> names the weights evaluated
(best, last, epoch_0003, final, ...) plus a short hash of the overrides when there are any. Under a launcher
inference is sharded and the metric computed once on the main process.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from accel_det.errors import run_cli


def evaluate_run(run_dir: Path, checkpoint: str = "best", overrides: list[str] | None = None) -> dict[str, Any] | None:
    """Score the weights on every val split of the run (``val``; also ``val2`` with ``[data.mix]``); returns
    the ``val`` metrics on the main process."""
    from rich.console import Console

    from accel_det.data import build_dataset, build_val_loader
    from accel_det.data.builder import eval_splits
    from accel_det.engine.distributed import build_accelerator, main_process_first
    from accel_det.engine.evaluator import Evaluator
    from accel_det.engine.run import open_run
    from accel_det.jsonio import write_json_atomic
    from accel_det.metrics import metrics_table

    opened = open_run(run_dir, checkpoint, overrides or [])
    recipe = opened.recipe
    accelerator = build_accelerator(recipe)
    if opened.weights.note:
        accelerator.print(f"note: {opened.weights.note}")
    splits = eval_splits(recipe)
    val_sets = main_process_first(accelerator, lambda: [build_dataset(recipe, split) for split in splits])
    model, *loaders = accelerator.prepare(opened.model, *(build_val_loader(recipe, ds) for ds in val_sets))
    first = None
    for split, ds, loader in zip(splits, val_sets, loaders):
        out = Evaluator(model, loader, accelerator, recipe, ds.category_ids)()
        if out.result is None:  # not the main process
            continue
        first = first or out.result
        tag = opened.result_tag() + ("" if split == "val" else f"_{split}")
        eval_dir = Path(run_dir) / "eval"
        eval_dir.mkdir(exist_ok=True)
        meta = {"weights": str(opened.weights.path), "checkpoint": opened.weights.tag, "split": split,
                "overrides": list(opened.overrides)}
        write_json_atomic(eval_dir / f"evaluate_{tag}.json", {**meta, **out.result})
        write_json_atomic(eval_dir / f"predictions_evaluate_{tag}.json", out.coco_results())
        console = Console(highlight=False, soft_wrap=True)
        on = "" if split == "val" else f" ({split})"
        console.print(metrics_table(out.result, title=f"{recipe.eval.metric}{on}: {opened.weights.path}"))
        console.print(f"wrote {eval_dir / f'evaluate_{tag}.json'}", markup=False)
    accelerator.end_training()
    return first


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir")
    parser.add_argument("--checkpoint", default="best",
                        help="best | last | checkpoint dir | weights file (default best, else last)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the run's recipe")


def run(args: argparse.Namespace) -> int:
    evaluate_run(Path(args.run_dir), args.checkpoint, list(args.overrides))
    return 0


def main(argv: list[str] | None = None) -> int:
    from accel_det.cli_args import parse_with_overrides

    parser = argparse.ArgumentParser(prog="accel_det.evaluate", description=__doc__)
    add_arguments(parser)
    args = parse_with_overrides(parser, argv)
    return run_cli(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
