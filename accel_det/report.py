"""``accel-det report RUN_DIR [--checkpoint best|last|PATH] [--conf 0.25] [--iou 0.45] [key=value ...]`` (also
``python -m accel_det.report``): ``RUN_DIR/plots/`` and ``RUN_DIR/report.html``, as the end of training writes
them, for any run dir, finished or still training.

The weights are opened as ``evaluate`` opens them (engine/run.py) and predict the val split once (the
evaluator's ``predict_records``; sharded under a launcher); no metric is computed again: the table and the
precision-recall curves are those of the evaluation of the same weights, ``eval/epoch_NNNN.json`` of their
checkpoint or ``eval/evaluate_<what>.json`` written by ``accel-det evaluate`` for them. A run dir with no
evaluation yet gets every plot that needs none (results, confusion matrix, labels, predictions) and a note;
one with no weights at all (killed before its first checkpoint) is an error, as for ``evaluate``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

from accel_det.errors import UsageError, run_cli


def pick_evaluation(run_dir: Path, opened: Any) -> tuple[dict[str, Any] | None, str]:
    """The val evaluation of the opened weights, the newest if there are two (their epoch's, and one by ``accel-det
    evaluate``): (result, its file relative to the run dir) or (None, "")."""
    weights, eval_dir = opened.weights, run_dir / "eval"
    candidates: list[Path] = []
    ckpt = weights.checkpoint
    if ckpt is not None and ckpt.resolve().parent == (run_dir / "checkpoints").resolve():
        m = re.fullmatch(r"epoch_(\d+)", ckpt.name)  # a mid-epoch checkpoint was never evaluated
        if m:
            candidates.append(eval_dir / f"epoch_{m[1]}.json")
    elif weights.tag == "final":  # model.safetensors: the weights of the last epoch, which is always evaluated
        epochs = [p for p in eval_dir.glob("epoch_*.json") if re.fullmatch(r"epoch_\d+", p.stem)]  # not val2's
        candidates.extend(sorted(epochs, key=lambda p: int(p.stem.removeprefix("epoch_")))[-1:])
    candidates.append(eval_dir / f"evaluate_{opened.result_tag()}.json")
    found = []
    for path in candidates:
        if not path.is_file():
            continue
        result = json.loads(path.read_text(encoding="utf-8"))
        scored = result.get("weights")  # evaluate_*.json: a keyword's weights may have moved on since
        if scored is None or Path(scored).resolve() == weights.path.resolve():
            found.append((path.stat().st_mtime, path, result))
    if not found:
        return None, ""
    # both score the same weights: the newer was written by the newer code (it may hold what the older lacks)
    _, path, result = max(found, key=lambda f: f[0])
    return result, path.relative_to(run_dir).as_posix()


def report_run(run_dir: Path, checkpoint: str = "best", overrides: list[str] | None = None,
               conf: float = 0.25, iou: float = 0.45) -> Any:
    """Write the report; returns what was written (``build.Written``) on the main process, None elsewhere."""
    from accel_det.data import build_dataset, build_val_loader
    from accel_det.engine.distributed import build_accelerator, main_process_first
    from accel_det.engine.evaluator import predict_records
    from accel_det.engine.run import open_run
    from accel_det.errors import DataError
    from accel_det.reporting.build import ReportData, write_report

    if not (math.isfinite(conf) and 0.0 <= conf <= 1.0):
        raise UsageError(f"--conf {conf}: must be in [0, 1]")
    if not (math.isfinite(iou) and 0.0 < iou <= 1.0):
        raise UsageError(f"--iou {iou}: must be in (0, 1]")
    opened = open_run(run_dir, checkpoint, overrides or [])
    recipe = opened.recipe
    accelerator = build_accelerator(recipe)
    if opened.weights.note:
        accelerator.print(f"note: {opened.weights.note}")
    val_set = main_process_first(accelerator, lambda: build_dataset(recipe, "val"))
    loader = accelerator.prepare(build_val_loader(recipe, val_set))
    model = opened.model.to(accelerator.device)
    records, _ = predict_records(model, loader, accelerator, letterbox=recipe.data.letterbox)
    if not accelerator.is_main_process:
        accelerator.end_training()
        return None
    train_set, train_error = None, ""
    try:
        train_set = build_dataset(recipe, "train")
    except DataError as exc:  # evaluate works without the training files; so does the report, less one plot
        train_error = str(exc)
    result, source = pick_evaluation(run_dir, opened)
    data = ReportData(
        run_dir=run_dir, recipe=recipe, weights=f"{opened.weights.path} ({opened.weights.tag})",
        records=[r for r in records if not r.get("unreadable")], eval_result=result, eval_source=source,
        train_set=train_set, train_error=train_error, val_set=val_set, conf=conf, iou=iou,
    )  # fmt: skip
    written = write_report(data, strict=True)
    for note in written.notes:
        print(f"note: {note}")
    pngs = sum(1 for f in written.files if f.suffix == ".png")
    print(f"wrote {run_dir / 'report.html'} and {pngs} plot(s) in {run_dir / 'plots'}")
    accelerator.end_training()
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir")
    parser.add_argument("--checkpoint", default="best",
                        help="whose predictions: best | last | checkpoint dir | weights file (default best, else "
                             "last)")
    # ranges are checked in report_run(): a bad value is one line like every other error
    parser.add_argument("--conf", type=float, default=0.25,
                        help="score threshold of the confusion matrix and the drawn predictions (default 0.25)")
    parser.add_argument("--iou", type=float, default=0.45,
                        help="IoU at which a prediction matches a ground-truth box in the confusion matrix "
                             "(default 0.45)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the run's recipe (e.g. data.root)")


def run(args: argparse.Namespace) -> int:
    report_run(Path(args.run_dir), args.checkpoint, list(args.overrides), args.conf, args.iou)
    return 0


def main(argv: list[str] | None = None) -> int:
    from accel_det.cli_args import parse_with_overrides

    parser = argparse.ArgumentParser(prog="accel_det.report", description=__doc__)
    add_arguments(parser)
    args = parse_with_overrides(parser, argv)
    return run_cli(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
