"""``accel-det evaluate RUN_DIR [--checkpoint best|last|PATH] [key=value ...]``.

Rebuilds the model and the val split from the run's ``recipe.json``, loads a checkpoint, scores it with the
recipe's metric and writes ``eval/evaluate_<checkpoint>.json`` (+ COCO-format predictions). Works under
``accelerate launch`` (inference is sharded, metrics computed once on the main process).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from accel_det.config import RecipeError, load_recipe


class EvaluateError(RuntimeError):
    pass


def run_recipe(run_dir: Path, overrides: list[str]) -> Any:
    path = run_dir / "recipe.json"
    if not path.is_file():
        raise EvaluateError(f"{run_dir}: not a run dir (no recipe.json)")
    return load_recipe(path, [*overrides, "model.weights=''"])


def checkpoint_weights(run_dir: Path, spec: str) -> Path:
    """best | last | checkpoint dir | weights file -> a weights file. 'best' falls back to 'last'."""
    from accel_det.engine.checkpoint import CheckpointError, resolve_checkpoint

    p = Path(spec)
    if p.is_file():
        return p
    if spec == "best" and not (run_dir / "checkpoints" / "best").is_file():
        spec = "last"
    try:
        ckpt = resolve_checkpoint(run_dir, spec)
    except CheckpointError as exc:
        final = run_dir / "model.safetensors"
        if spec == "last" and final.is_file():
            return final
        raise EvaluateError(str(exc)) from None
    assert ckpt is not None
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (ckpt / name).is_file():
            return ckpt / name
    raise EvaluateError(f"{ckpt}: checkpoint holds no model weights")


def evaluate_run(run_dir: Path, checkpoint: str, overrides: list[str]) -> dict[str, Any] | None:
    from accel_det.data import build_datasets, build_loaders
    from accel_det.engine.distributed import build_accelerator, write_json_atomic
    from accel_det.engine.evaluator import evaluate
    from accel_det.engine.progress import RunLog
    from accel_det.metrics import coco_results, metrics_table
    from accel_det.models import build_model, load_weights

    recipe = run_recipe(run_dir, overrides)
    weights = checkpoint_weights(run_dir, checkpoint)
    accelerator = build_accelerator(recipe)
    log = RunLog(accelerator, run_dir)
    with accelerator.main_process_first():
        train_ds, val_ds = build_datasets(recipe)
    _, val_loader = build_loaders(recipe, train_ds, val_ds, seed=recipe.train.seed)
    model, _ = build_model(recipe)
    report = load_weights(model, weights)
    if report.skipped or report.missing:
        raise EvaluateError(f"{weights}: does not fit the run's model: {report.summary()}")
    model, val_loader = accelerator.prepare(model, val_loader)
    result, records, _ = evaluate(accelerator.unwrap_model(model), val_loader, accelerator, recipe)
    if result is not None:
        tag = checkpoint if checkpoint in ("best", "last") else Path(checkpoint).stem
        out = run_dir / "eval"
        out.mkdir(exist_ok=True)
        write_json_atomic(out / f"evaluate_{tag}.json", {"weights": str(weights), **result})
        write_json_atomic(out / f"predictions_evaluate_{tag}.json", coco_results(records, val_ds.category_ids))
        log.console.print(metrics_table(result, title=f"{recipe.eval.metric}: {weights}"))
        log.console.print(f"wrote {out / f'evaluate_{tag}.json'}")
    accelerator.wait_for_everyone()
    return result


def main(args: argparse.Namespace) -> int:
    from accel_det.data import DatasetError
    from accel_det.engine.checkpoint import CheckpointError
    from accel_det.engine.distributed import LaunchError
    from accel_det.engine.evaluator import EvaluationError
    from accel_det.models import WeightsError

    try:
        evaluate_run(Path(args.run_dir), args.checkpoint, list(args.overrides))
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (EvaluateError, DatasetError, LaunchError, WeightsError, CheckpointError, EvaluationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
