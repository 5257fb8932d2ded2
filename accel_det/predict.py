"""``accel-det predict RUN_DIR IMAGES... --out DIR`` (also ``python -m accel_det.predict``): predictions.json
plus one PNG per image with the boxes drawn, in the image's own pixels.

A file written by ``accel-det export`` (``.onnx``: onnxruntime, its CUDA provider when there is one; ``.pt2``:
the torch.export program, CPU) predicts in place of the run's weights: as ``--checkpoint FILE`` with the run
(its class names must be the run's), or as RUN_DIR itself, since the file carries class names, input size and
letterbox. The images, resizing, drawing and JSON are the same code either way.

Inputs are image files and folders (searched recursively; hidden files and folders and anything under
``--out`` are skipped, so a second run never predicts on the first one's drawings). Drawn files mirror the
input paths under ``--out``; two inputs that would map to one name get a short hash of their full path.
An image that cannot be read is reported (a ``warning: skipped`` line naming it, and an ``error`` entry at its
place in predictions.json) and skipped, the others are predicted, and the exit code is 1.
Every file is written whole (temp file + rename): a killed run leaves nothing half-written.

Speed: ``--workers`` DataLoader processes decode and resize the images ahead of the forward pass (batches of
``--batch-size``, results in input order), and as many threads (at least one) draw the PNGs while the next
batches run (predict_io.py); ``--no-draw`` writes predictions.json only.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from accel_det.errors import DataError, UsageError, run_cli


def _exported_file(run_dir: Path, checkpoint: str) -> Path | None:
    """The exported file to predict with, if RUN_DIR or --checkpoint names one."""
    from accel_det.deploy.runner import is_exported

    for candidate in (Path(run_dir), Path(checkpoint)):
        if is_exported(candidate):
            if not candidate.is_file():
                raise UsageError(f"{candidate}: no such exported file")
            return candidate
    return None


def _open_exported(path: Path, run_dir: Path) -> tuple[Any, Any, list[str], int, bool, int]:
    """(model, resize, class names, img_dim, letterbox, channels) of an exported file; with a run dir beside it,
    the file must be of the run's classes, size and resizing (else its labels would be named wrongly)."""
    from accel_det.data import build_transforms
    from accel_det.deploy.runner import ExportedDetector
    from accel_det.engine.run import run_recipe
    from accel_det.errors import CheckpointError

    model = ExportedDetector(path)
    meta = model.meta
    names, dim, letterbox, channels = meta["class_names"], meta["img_dim"], meta["letterbox"], meta["channels"]
    if Path(run_dir) != path:
        recipe = run_recipe(Path(run_dir))
        ours = (recipe.output_class_names, recipe.model.img_dim, recipe.data.letterbox, recipe.model.channels)
        if ours != (names, dim, letterbox, channels):
            raise CheckpointError(f"{path}: exported for classes {names} at {dim} px (letterbox {letterbox}), "
                                  f"but {run_dir} has {ours[0]} at {ours[1]} px (letterbox {ours[2]})")
    print(f"note: predicting with {path} ({path.suffix[1:]} on {model.device})")
    return model, build_transforms(False, dim, [], channels=channels, letterbox=letterbox), names, dim, letterbox, \
        channels


def predict(run_dir: Path, inputs: list[str], out: Path, checkpoint: str = "best", conf: float = 0.3,
            batch_size: int = 8, workers: int | None = None, draw: bool = True) -> list[dict[str, Any]]:
    """Predict on every image of ``inputs``; write ``out/predictions.json`` (and, with ``draw``, one PNG per
    image) and return its entries, in input order. ``workers``: reader processes (None: ``default_workers``;
    0: read in this process); as many threads (at least one) draw the PNGs."""
    import torch

    from accel_det.data import eval_transforms, to_original
    from accel_det.engine.evaluator import to_float_images
    from accel_det.engine.run import open_run
    from accel_det.predict_io import (
        Drawer,
        collect_images,
        default_workers,
        drawn_names,
        image_loader,
        predictions_json,
        write_text_atomic,
    )

    if not (math.isfinite(conf) and 0.0 <= conf <= 1.0):
        raise UsageError(f"--conf {conf}: must be in [0, 1]")
    if batch_size <= 0:
        raise UsageError(f"--batch-size {batch_size}: must be > 0")
    if workers is not None and workers < 0:
        raise UsageError(f"--workers {workers}: must be >= 0")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    items = collect_images(inputs, out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    exported = _exported_file(run_dir, checkpoint)
    if exported is not None:
        model, resize, names, dim, letterbox, channels = _open_exported(exported, run_dir)
        device = torch.device("cpu")  # the runner moves the batch where its provider runs
    else:
        opened = open_run(run_dir, checkpoint)
        if opened.weights.note:
            print(f"note: {opened.weights.note}")
        recipe, model = opened.recipe, opened.model
        model.to(device)
        resize, names, dim = eval_transforms(recipe), recipe.output_class_names, recipe.model.img_dim
        letterbox, channels = recipe.data.letterbox, recipe.model.channels
    if workers is None:
        workers = default_workers(cuda=(model.device if exported is not None else device.type) == "cuda")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create: {exc.strerror or exc}") from None
    results: list[dict[str, Any] | None] = [None] * len(items)
    skipped: list[str] = []
    pngs = drawn_names(items)
    loader = image_loader([f for f, _ in items], channels, resize, batch_size, workers, keep_pixels=draw)
    with Drawer(max(1, workers)) as drawer:
        for batch in loader:
            for bad in batch.unreadable:
                assert bad.error is not None
                print(f"warning: skipped {bad.error}")
                skipped.append(bad.error)
                results[bad.index] = {"file": str(items[bad.index][0]), "error": bad.error}
            if batch.images is None:
                continue
            x = to_float_images(batch.images.to(device, non_blocking=True))
            with torch.inference_mode():
                outputs = model(x)
            for item, det in zip(batch.loaded, outputs):
                (h, w), f, png = item.size, items[item.index][0], pngs[item.index]
                # the model saw the image resized (or letterboxed) to dim x dim: back to the image's own pixels
                scores = det["scores"].cpu()
                keep = scores >= conf
                boxes = to_original(det["boxes"].cpu(), (h, w), dim, letterbox)[keep]
                # python numbers once per image: a loop over tensor elements makes a tensor of each
                scores, labels = scores[keep].tolist(), det["labels"].cpu()[keep].tolist()
                entry: dict[str, Any] = {"file": str(f), "width": w, "height": h}
                if draw:
                    assert item.pixels is not None
                    drawer(item.pixels, boxes, [f"{names[lab - 1]} {s:.2f}" for lab, s in zip(labels, scores)],
                           out / png)
                    entry["drawn"] = png.as_posix()
                entry["detections"] = [
                    {"box": [round(v, 2) for v in b], "score": round(s, 4), "label": lab, "class_name": names[lab - 1]}
                    for b, s, lab in zip(boxes.tolist(), scores, labels)
                ]
                results[item.index] = entry
    done = [r for r in results if r is not None]
    assert len(done) == len(items)  # the loader yields every index exactly once
    write_text_atomic(out / "predictions.json", predictions_json(done))
    if skipped:
        raise DataError(f"{len(skipped)} of {len(items)} images could not be read and were skipped (first: "
                        f"{skipped[0]}); the others' predictions are in {out / 'predictions.json'}")
    return done


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run dir, or a file written by accel-det export (.onnx, .pt2)")
    parser.add_argument("images", nargs="+", help="image files or folders")
    parser.add_argument("--out", required=True, help="output folder: predictions.json + drawn PNGs")
    parser.add_argument("--checkpoint", default="best",
                        help="best | last | checkpoint dir | weights file | an exported .onnx/.pt2")
    # ranges are checked in predict(): a bad value is one line like every other error, not argparse's usage
    parser.add_argument("--conf", type=float, default=0.3, help="score threshold in [0, 1] for output and drawing")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes decoding and resizing the images (0: in the main process), and threads "
                        "drawing the PNGs (at least 1); default: on a GPU one per CPU core but one, on the CPU one "
                        "per 4 cores, at most 8")
    parser.add_argument("--no-draw", dest="draw", action="store_false",
                        help="write predictions.json only, no drawn PNGs")


def run(args: argparse.Namespace) -> int:
    res = predict(Path(args.run_dir), args.images, Path(args.out), args.checkpoint, args.conf, args.batch_size,
                  args.workers, args.draw)
    n = sum(len(r.get("detections", ())) for r in res)
    print(f"{len(res)} images, {n} detections >= {args.conf} -> {Path(args.out) / 'predictions.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="accel_det.predict", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_cli(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
