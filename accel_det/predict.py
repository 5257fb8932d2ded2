"""``accel-det predict RUN_DIR IMAGES... --out DIR`` (also ``python -m accel_det.predict``): predictions.json
plus one PNG per image with the boxes drawn, in the image's own pixels.

A file written by ``accel-det export`` (``.onnx``: onnxruntime, its CUDA provider when there is one; ``.pt2``:
the torch.export program, CPU) predicts in place of the run's weights: as ``--checkpoint FILE`` with the run
(its class names must be the run's), or as RUN_DIR itself, since the file carries class names, input size and
letterbox. The images, resizing, drawing and JSON are the same code either way.

Inputs are image files and folders (searched recursively; hidden files and folders and anything under
``--out`` are skipped, so a second run never predicts on the first one's drawings). Drawn files mirror the
input paths under ``--out``; two inputs that would map to one name get a short hash of their full path.
An image that cannot be read is reported and skipped, the others are predicted, and the exit code is 1.
Every file is written whole (temp file + rename): a killed run leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from accel_det.errors import DataError, UsageError, run_cli


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def collect_images(inputs: list[str], out: Path) -> list[tuple[Path, Path]]:
    """(image file, its path relative to what was given) for every input image, in a stable order."""
    from accel_det.data.common import IMAGE_SUFFIXES, is_hidden

    out_abs = out.resolve()
    found: list[tuple[Path, Path]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if (is_hidden(f, p) or f.suffix.lower() not in IMAGE_SUFFIXES or not f.is_file()
                        or _inside(f.resolve(), out_abs)):
                    continue
                found.append((f, f.relative_to(p)))
        elif p.is_file():
            found.append((p, Path(p.name)))
        else:
            raise DataError(f"{p}: no such image or folder")
    seen: set[Path] = set()
    unique = []
    for f, rel in found:  # the same file given twice (directly and in a folder) is predicted once
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append((f, rel))
    if not unique:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(inputs)}")
    return unique


def drawn_names(items: list[tuple[Path, Path]]) -> list[Path]:
    """Output PNG paths (relative to --out): the input's relative path as .png; where two inputs collide
    (a/x.jpg and a/x.png, or two folders of one name), each gets a hash of its full path in the name."""
    plain = [rel.with_suffix(".png") for _, rel in items]
    count = Counter(plain)
    return [
        name if count[name] == 1
        else name.with_name(f"{name.stem}.{hashlib.sha1(str(f.resolve()).encode()).hexdigest()[:8]}.png")
        for (f, _), name in zip(items, plain)
    ]


def _save_png(array: Any, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


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
            batch_size: int = 8) -> list[dict[str, Any]]:
    import torch
    from torchvision.utils import draw_bounding_boxes

    from accel_det.data import eval_transforms, load_image, to_original
    from accel_det.engine.distributed import write_json_atomic
    from accel_det.engine.run import open_run

    if not (math.isfinite(conf) and 0.0 <= conf <= 1.0):
        raise UsageError(f"--conf {conf}: must be in [0, 1]")
    if batch_size <= 0:
        raise UsageError(f"--batch-size {batch_size}: must be > 0")
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
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create: {exc.strerror or exc}") from None
    results: list[dict[str, Any]] = []
    skipped: list[str] = []
    pngs = drawn_names(items)
    for start in range(0, len(items), batch_size):
        batch = []
        for (f, _), png in zip(items[start:start + batch_size], pngs[start:start + batch_size]):
            try:
                batch.append((f, png, load_image(f, channels)))
            except DataError as exc:
                skipped.append(str(exc))
                results.append({"file": str(f), "error": str(exc)})
        if not batch:
            continue
        x = torch.stack([resize(img) for _, _, img in batch]).to(device).float().div_(255)
        with torch.inference_mode():
            outputs = model(x)
        for (f, png, img), det in zip(batch, outputs):
            h, w = img.shape[-2:]
            # the model saw the image resized (or letterboxed) to dim x dim: back to the image's own pixels
            keep = det["scores"].cpu() >= conf
            boxes = to_original(det["boxes"].cpu(), (h, w), dim, letterbox)[keep]
            scores, labels = det["scores"].cpu()[keep], det["labels"].cpu()[keep]
            text = [f"{names[int(lab) - 1]} {float(s):.2f}" for lab, s in zip(labels, scores)]
            rgb = img.as_subclass(torch.Tensor)
            rgb = rgb.expand(3, -1, -1) if rgb.shape[0] == 1 else rgb
            drawn = draw_bounding_boxes(rgb, boxes, labels=text, width=2) if len(boxes) else rgb
            _save_png(drawn.permute(1, 2, 0).numpy(), out / png)
            results.append({
                "file": str(f), "width": int(w), "height": int(h), "drawn": png.as_posix(),
                "detections": [
                    {"box": [round(float(v), 2) for v in b], "score": round(float(s), 4),
                     "label": int(lab), "class_name": names[int(lab) - 1]}
                    for b, s, lab in zip(boxes, scores, labels)
                ],
            })
    write_json_atomic(out / "predictions.json", results)
    if skipped:
        raise DataError(f"{len(skipped)} of {len(items)} images could not be read and were skipped (first: "
                        f"{skipped[0]}); the others' predictions are in {out / 'predictions.json'}")
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run dir, or a file written by accel-det export (.onnx, .pt2)")
    parser.add_argument("images", nargs="+", help="image files or folders")
    parser.add_argument("--out", required=True, help="output folder: predictions.json + drawn PNGs")
    parser.add_argument("--checkpoint", default="best",
                        help="best | last | checkpoint dir | weights file | an exported .onnx/.pt2")
    # ranges are checked in predict(): a bad value is one line like every other error, not argparse's usage
    parser.add_argument("--conf", type=float, default=0.3, help="score threshold in [0, 1] for output and drawing")
    parser.add_argument("--batch-size", type=int, default=8)


def run(args: argparse.Namespace) -> int:
    res = predict(Path(args.run_dir), args.images, Path(args.out), args.checkpoint, args.conf, args.batch_size)
    n = sum(len(r["detections"]) for r in res)
    print(f"{len(res)} images, {n} detections >= {args.conf} -> {Path(args.out) / 'predictions.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="accel_det.predict", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_cli(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
