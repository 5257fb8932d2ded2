"""``accel-det predict RUN_DIR IMAGES... --out DIR``: predictions.json + one PNG per image with boxes drawn."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from accel_det.config import RecipeError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def collect_images(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such image or folder")
    if not files:
        raise FileNotFoundError(f"no images in {', '.join(inputs)}")
    return files


def _out_names(files: list[Path]) -> list[str]:
    # distinct PNG names even when two folders hold the same file name
    seen: dict[str, int] = {}
    names = []
    for f in files:
        n = seen.get(f.stem, 0)
        seen[f.stem] = n + 1
        names.append(f"{f.stem}.png" if n == 0 else f"{f.stem}_{n}.png")
    return names


def predict(run_dir: Path, inputs: list[str], out: Path, checkpoint: str = "best", conf: float = 0.3,
            batch_size: int = 8) -> list[dict[str, Any]]:
    import torch
    from PIL import Image
    from torchvision.transforms import v2
    from torchvision.utils import draw_bounding_boxes

    from accel_det.data.common import load_image
    from accel_det.evaluate import EvaluateError, checkpoint_weights, run_recipe
    from accel_det.models import build_model, load_weights

    recipe = run_recipe(run_dir, [])
    files = collect_images(inputs)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = build_model(recipe)
    weights = checkpoint_weights(run_dir, checkpoint)
    report = load_weights(model, weights)
    if report.skipped or report.missing:
        raise EvaluateError(f"{weights}: does not fit the run's model: {report.summary()}")
    model.to(device).eval()
    dim, names = recipe.model.img_dim, recipe.data.class_names
    resize = v2.Resize((dim, dim))
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    png_names = _out_names(files)
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        originals = [load_image(f, recipe.model.channels) for f in chunk]
        x = torch.stack([resize(img) for img in originals]).to(device).float().div_(255)
        with torch.inference_mode():
            outputs = model(x)
        for f, img, det, png in zip(chunk, originals, outputs, png_names[start:start + batch_size]):
            h, w = img.shape[-2:]
            scale = torch.tensor([w / dim, h / dim, w / dim, h / dim])
            keep = det["scores"].cpu() >= conf
            boxes = (det["boxes"].cpu().float() * scale)[keep]
            scores, labels = det["scores"].cpu()[keep], det["labels"].cpu()[keep]
            text = [f"{names[int(lab) - 1]} {float(s):.2f}" for lab, s in zip(labels, scores)]
            rgb = img.as_subclass(torch.Tensor)
            rgb = rgb.expand(3, -1, -1) if rgb.shape[0] == 1 else rgb
            drawn = draw_bounding_boxes(rgb, boxes, labels=text, width=2) if len(boxes) else rgb
            Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(out / png)
            results.append({
                "file": str(f), "width": int(w), "height": int(h), "drawn": png,
                "detections": [
                    {"box": [round(float(v), 2) for v in b], "score": round(float(s), 4),
                     "label": int(lab), "class_name": names[int(lab) - 1]}
                    for b, s, lab in zip(boxes, scores, labels)
                ],
            })
    tmp = out / ".predictions.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out / "predictions.json")
    return results


def main(args: argparse.Namespace) -> int:
    from accel_det.data import DatasetError
    from accel_det.evaluate import EvaluateError
    from accel_det.models import WeightsError

    try:
        res = predict(Path(args.run_dir), args.images, Path(args.out), args.checkpoint, args.conf, args.batch_size)
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (EvaluateError, DatasetError, WeightsError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    n = sum(len(r["detections"]) for r in res)
    print(f"{len(res)} images, {n} detections >= {args.conf} -> {Path(args.out) / 'predictions.json'}")
    return 0
