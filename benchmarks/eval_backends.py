"""COCO bbox evaluation: faster-coco-eval vs pycocotools on a generated COCO-sized set.

    python benchmarks/eval_backends.py            # 5000 images, ~35k gt, ~500k detections, 80 classes
    python benchmarks/eval_backends.py --write    # also append a dated row to BENCHMARKS.md

Three timings per backend, all on the main process as in training:
  prep   records -> COCO gt dict + results list (our code, the same for both backends)
  build  backend COCO() index of the gt + loadRes of the detections
  eval   evaluate() + accumulate() + summarize (the 12 stats)
The headline speedup is eval only (build excluded); "total" includes prep and build. Both backends must give
the same 12 stats (to 1e-6) or the script fails.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accel_det.metrics.coco import (  # noqa: E402
    BACKENDS,
    build_coco,
    coco_ground_truth,
    coco_results,
    run_cocoeval,
    summarize,
)

SECTION = "## COCO evaluation backends (benchmarks/eval_backends.py)"
TABLE_HEAD = (
    "| date | machine | cores | python | images | gt | detections | pycocotools prep / build / eval s "
    "| faster-coco-eval prep / build / eval s | speedup eval | speedup total |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def generate(num_images: int, num_classes: int, gt_per_image: float, dets_per_image: int, seed: int) -> list:
    """COCO-like records: 640x480 images, Poisson gt counts with COCO-ish sizes (many small boxes), ~3%
    crowd; per image ``dets_per_image`` detections: noisy copies of the gt (some relabelled) plus clutter,
    scores higher for the better copies, as a real detector's output at a low score threshold."""
    rng = np.random.default_rng(seed)
    h, w = 480, 640
    records = []
    for i in range(num_images):
        n = int(rng.poisson(gt_per_image))
        side = np.exp(rng.uniform(np.log(6), np.log(400), (n, 2)))  # log-uniform: small/medium/large mix
        xy = rng.uniform(0, 1, (n, 2)) * np.maximum([w, h] - side, 1)
        gt = np.concatenate([xy, np.minimum(xy + side, [w, h])], axis=1)
        gl = rng.integers(1, num_classes + 1, n)
        crowd = rng.random(n) < 0.03
        # detections: up to 4 jittered copies per gt (first one tight), rest clutter
        copies = min(4 * n, dets_per_image)
        src = rng.integers(0, n, copies) if n else np.zeros(0, int)
        scale = np.repeat(side[src], 2, axis=1) if n else np.zeros((0, 4))
        jitter = rng.normal(0, 1, (copies, 4)) * scale * 0.1
        boxes_t = gt[src] + jitter if n else np.zeros((0, 4))
        labels_t = gl[src].copy() if n else np.zeros(0, int)
        flip = rng.random(copies) < 0.15
        labels_t[flip] = rng.integers(1, num_classes + 1, int(flip.sum()))
        scores_t = np.clip(0.9 - np.abs(jitter).mean(1) / 20 + rng.normal(0, 0.15, copies), 0.001, 1)
        nc = dets_per_image - copies
        cxy = rng.uniform(0, [w, h], (nc, 2))
        clutter = np.concatenate([cxy, cxy + np.exp(rng.uniform(np.log(4), np.log(300), (nc, 2)))], axis=1)
        boxes = np.concatenate([boxes_t, clutter])
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        records.append(
            {
                "image_id": i + 1,
                "height": h,
                "width": w,
                "gt_boxes": gt,
                "gt_labels": gl,
                "gt_ignore": crowd,
                "boxes": boxes,
                "scores": np.concatenate([scores_t, rng.uniform(0.001, 0.5, nc)]),
                "labels": np.concatenate([labels_t, rng.integers(1, num_classes + 1, nc)]),
            }
        )
    return records


def time_backend(records: list, class_names: list[str], backend: str, max_det: int) -> dict:
    t0 = time.perf_counter()
    gt_dict = coco_ground_truth(records, class_names)
    results = coco_results(records, list(range(1, len(class_names) + 1)))
    t1 = time.perf_counter()
    gt, dt = build_coco(gt_dict, results, backend)
    t2 = time.perf_counter()
    stats = summarize(run_cocoeval(gt, dt, backend, max_det), max_det)
    t3 = time.perf_counter()
    num_gt = len(gt_dict["annotations"])
    return {"prep": t1 - t0, "build": t2 - t1, "eval": t3 - t2, "stats": stats, "num_gt": num_gt}


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:  # platform.processor() is just "x86_64" on Linux; the model name says more
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{name} ({line.split(':', 1)[1].strip()})"
    except OSError:
        pass
    return name


def write_row(path: Path, row: str) -> None:
    """Append ``row`` to this script's table in BENCHMARKS.md (creating the file/section if missing)."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    lines = text.rstrip("\n").split("\n")
    if SECTION not in lines:
        lines += ["", SECTION, "", TABLE_HEAD, row]
    else:
        start = lines.index(SECTION)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        table_rows = [i for i in range(start, end) if lines[i].startswith("|")]
        if table_rows:
            lines.insert(table_rows[-1] + 1, row)
        else:
            lines[end:end] = ["", TABLE_HEAD, row]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--classes", type=int, default=80)
    ap.add_argument("--gt-per-image", type=float, default=7.0)
    ap.add_argument("--dets-per-image", type=int, default=100)
    ap.add_argument("--max-det", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write", action="store_true", help="append a row to BENCHMARKS.md")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "BENCHMARKS.md")
    args = ap.parse_args()

    t = time.perf_counter()
    records = generate(args.images, args.classes, args.gt_per_image, args.dets_per_image, args.seed)
    num_dets = sum(len(r["scores"]) for r in records)
    print(f"generated {args.images} images, {num_dets} detections in {time.perf_counter() - t:.1f}s")
    names = [f"class{k}" for k in range(1, args.classes + 1)]

    runs = {}
    for backend in reversed(BACKENDS):  # pycocotools first: the slow one, so a failure shows early
        runs[backend] = r = time_backend(records, names, backend, args.max_det)
        print(
            f"{backend:>16}: prep {r['prep']:6.1f}s  build {r['build']:6.1f}s  eval {r['eval']:7.1f}s  "
            f"AP {r['stats']['AP']:.4f}  AP50 {r['stats']['AP50']:.4f}"
        )
    ref, fast = runs["pycocotools"], runs["faster_coco_eval"]
    diff = max(abs(ref["stats"][k] - fast["stats"][k]) for k in ref["stats"])
    assert diff <= 1e-6, f"backends disagree by {diff}: {ref['stats']} vs {fast['stats']}"
    speed_eval = ref["eval"] / fast["eval"]
    total = {k: r["prep"] + r["build"] + r["eval"] for k, r in runs.items()}
    speed_total = total["pycocotools"] / total["faster_coco_eval"]
    print(f"12 stats identical (max diff {diff:.1e})")
    print(
        f"speedup faster-coco-eval / pycocotools: eval {speed_eval:.1f}x, prep+build+eval {speed_total:.1f}x"
    )

    if args.write:
        row = (
            f"| {datetime.date.today().isoformat()} | {machine()} | {os.cpu_count()} "
            f"| {platform.python_version()} | {args.images} | {ref['num_gt']} | {num_dets} "
            f"| {ref['prep']:.1f} / {ref['build']:.1f} / {ref['eval']:.1f} "
            f"| {fast['prep']:.1f} / {fast['build']:.1f} / {fast['eval']:.1f} "
            f"| {speed_eval:.1f}x | {speed_total:.1f}x |"
        )
        write_row(args.out, row)
        print(f"appended to {args.out}")


if __name__ == "__main__":
    main()
