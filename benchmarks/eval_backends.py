"""COCO bbox evaluation end to end (records -> stats): faster-coco-eval vs pycocotools on a generated COCO-sized set.

    python benchmarks/eval_backends.py            # 5000 images, ~35k gt, ~500k detections, 80 classes
    python benchmarks/eval_backends.py --write    # also append a dated row to BENCHMARKS.md
    python benchmarks/eval_backends.py --profile  # also where a cached-gt faster-coco-eval call spends its time

Each timing is one ``coco_evaluate(records, ...)`` call on the main process, as in training: flattening the
records, the gt index, the backend's evaluate + accumulate, the 12 stats, per-class AP and the PR curves.
Per backend: "cold" (gt cache cleared: the first evaluation of a val set) and "cached" (the same val set again,
as every later eval.freq epoch). Wall and CPU (process) time are both kept: the machine may be shared, and CPU
time is what other processes' load changes least. For reference, faster-coco-eval through its public API
(``COCO`` + ``loadRes`` + ``COCOeval_faster``, from the same records) is timed too. Both backends must give the
same 12 stats and per-class AP (to 1e-6) or the script fails.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import os
import platform
import pstats
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accel_det.metrics.coco import (  # noqa: E402
    build_coco,
    clear_gt_cache,
    coco_evaluate,
    coco_ground_truth,
    coco_results,
    run_cocoeval,
    summarize,
)

SECTION = "## COCO evaluation backends (benchmarks/eval_backends.py)"
TABLE_HEAD = (
    "| date | machine | cores | python | images | gt | detections | pycocotools s cold / cached gt "
    "| faster-coco-eval s cold / cached gt | speedup cold / cached (wall) | speedup cold / cached (CPU) "
    "| faster-coco-eval public API s |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
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


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, wall s, CPU s of this process)."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def public_api(records: list, names: list[str], max_det: int) -> dict[str, float]:
    """faster-coco-eval as its API is documented: COCO gt + loadRes + COCOeval_faster (no gt cache)."""
    gt_dict = coco_ground_truth(records, names)
    results = coco_results(records, list(range(1, len(names) + 1)))
    return summarize(run_cocoeval(*build_coco(gt_dict, results, "faster_coco_eval"), "faster_coco_eval", max_det),
                     max_det)


def compare(ref: dict, fast: dict) -> float:
    """Largest difference over the 12 stats and the per-class AP/AP50 (nan = no gt on both sides)."""
    diffs = [abs(ref[k] - fast[k]) for k in ref if isinstance(ref[k], float)]
    for name, pc in ref["per_class"].items():
        for k, v in pc.items():
            w = fast["per_class"][name][k]
            if not (np.isnan(v) and np.isnan(w)):
                diffs.append(abs(v - w))
    return max(diffs)


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
    """Append ``row`` to this script's end-to-end table in BENCHMARKS.md (creating the table or the file)."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    lines = text.rstrip("\n").split("\n")
    head = TABLE_HEAD.split("\n")[0]
    if SECTION not in lines:
        lines += ["", SECTION, "", *TABLE_HEAD.split("\n"), row]
    else:
        start = lines.index(SECTION)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        if head in lines[start:end]:  # after the last row of this table
            i = lines.index(head, start) + 2
            while i < end and lines[i].startswith("|"):
                i += 1
            lines.insert(i, row)
        else:  # a new table at the end of the section, after any older one
            while end > start and not lines[end - 1].strip():
                end -= 1
            lines[end:end] = ["", *TABLE_HEAD.split("\n"), row]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--classes", type=int, default=80)
    ap.add_argument("--gt-per-image", type=float, default=7.0)
    ap.add_argument("--dets-per-image", type=int, default=100)
    ap.add_argument("--max-det", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="cProfile one cached-gt faster-coco-eval call")
    ap.add_argument("--write", action="store_true", help="append a row to BENCHMARKS.md")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "BENCHMARKS.md")
    args = ap.parse_args()

    t = time.perf_counter()
    records = generate(args.images, args.classes, args.gt_per_image, args.dets_per_image, args.seed)
    num_dets = sum(len(r["scores"]) for r in records)
    num_gt = sum(len(r["gt_labels"]) for r in records)
    print(f"generated {args.images} images, {num_gt} gt, {num_dets} detections in {time.perf_counter() - t:.1f}s")
    names = [f"class{k}" for k in range(1, args.classes + 1)]

    def run(backend: str) -> Any:
        return coco_evaluate(records, names, backend=backend, max_det=args.max_det)

    runs: dict[str, dict[str, Any]] = {}
    for backend in ("pycocotools", "faster_coco_eval"):  # the slow one first, so a failure shows early
        clear_gt_cache()
        result, cold_wall, cold_cpu = timed(lambda b=backend: run(b))
        _, warm_wall, warm_cpu = timed(lambda b=backend: run(b))
        runs[backend] = {"result": result, "wall": (cold_wall, warm_wall), "cpu": (cold_cpu, warm_cpu)}
        print(f"{backend:>16}: cold {cold_wall:6.1f}s wall {cold_cpu:6.1f}s CPU | cached gt {warm_wall:6.1f}s wall "
              f"{warm_cpu:6.1f}s CPU | AP {result['AP']:.4f} AP50 {result['AP50']:.4f}")
    stats_api, api_wall, api_cpu = timed(lambda: public_api(records, names, args.max_det))
    print(f"faster-coco-eval public API: {api_wall:6.1f}s wall {api_cpu:6.1f}s CPU")

    ref, fast = runs["pycocotools"], runs["faster_coco_eval"]
    diff = compare(ref["result"], fast["result"])
    assert diff <= 1e-6, f"backends disagree by {diff}"
    api_diff = max(abs(stats_api[k] - fast["result"][k]) for k in stats_api)
    assert api_diff <= 1e-12, f"public API and coco_evaluate disagree by {api_diff}"
    speed = {m: [r / f for r, f in zip(ref[m], fast[m], strict=True)] for m in ("wall", "cpu")}
    print(f"12 stats + per-class AP identical across backends (max diff {diff:.1e})")
    print(f"speedup faster-coco-eval / pycocotools end to end: cold {speed['wall'][0]:.1f}x wall "
          f"({speed['cpu'][0]:.1f}x CPU), cached gt {speed['wall'][1]:.1f}x wall ({speed['cpu'][1]:.1f}x CPU)")

    if args.profile:
        prof = cProfile.Profile()
        prof.runcall(run, "faster_coco_eval")
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(15)
        print(s.getvalue())

    if args.write:
        row = (
            f"| {datetime.date.today().isoformat()} | {machine()} | {os.cpu_count()} "
            f"| {platform.python_version()} | {args.images} | {num_gt} | {num_dets} "
            f"| {ref['wall'][0]:.1f} / {ref['wall'][1]:.1f} | {fast['wall'][0]:.2f} / {fast['wall'][1]:.2f} "
            f"| {speed['wall'][0]:.1f}x / {speed['wall'][1]:.1f}x | {speed['cpu'][0]:.1f}x / {speed['cpu'][1]:.1f}x "
            f"| {api_wall:.1f} |"
        )
        write_row(args.out, row)
        print(f"appended to {args.out}")


if __name__ == "__main__":
    main()
