"""``accel-det predict`` vs a bare ``model.eval()`` loop over the same files: img/s, in one process, alternated.

    python benchmarks/predict.py [--images 200] [--batch-size 8] [--rounds 3] [--threads N] [--workers 1 2 ...]
                                  [--set KEY=VALUE ...] [--write]

The run dir is the demo recipe's model (or ``--model`` at ``--img-dim``) randomly initialised with BatchNorm
calibrated on noise, written the way the tests write one (tests/test_export.py ``make_run_from``); no training.
The images are ``--images`` JPEGs of random sizes in 128..640 px (gradients, filled shapes, a little noise).

Timed, each call from the run dir to the results in memory (model opened with ``open_run`` in both):

- *bare*: one process, batches of ``--batch-size``: PIL decode -> uint8 tensor -> resize to img_dim (the same
  antialiased tensor resize as the val transforms) -> float -> ``model(x)`` -> score threshold and boxes back to
  the image's pixels (``to_original``); *bare + draw* also draws and writes each PNG with predict's own
  ``draw_png``, in the loop.
- *predict*: ``accel_det.predict.predict(...)`` in process, as the command calls it (finding the files, the
  DataLoader with ``--workers``, JSON written), ``draw=False`` (``--no-draw``) or drawing.

The variants run one after the other in each of ``--rounds`` rounds (after one untimed warm-up round), so a
slow spell on a shared machine hits them alike, in an order rotated by one each round, each after a
``gc.collect()``; the median per variant is reported, and ratios of medians, of paired calls and of CPU time.
Before timing, the bare loop's detections are checked equal to predict's JSON (the same work done).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        w, h = (int(v) for v in rng.integers(128, 641, size=2))
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * rng.uniform(0.1, 0.5) + yy * rng.uniform(0.1, 0.5) + rng.uniform(0, 255)) % 256
                         for _ in range(3)], axis=-1)
        base += rng.normal(0, 6, base.shape)
        img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(1, 6))):
            x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
            x1, y1 = x0 + int(rng.integers(10, w // 2 + 12)), y0 + int(rng.integers(10, h // 2 + 12))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
        path = folder / f"img_{i:04d}.jpg"
        img.save(path, quality=90)
        files.append(path)
    return files


def bare(run_dir: Path, files: list[Path], batch_size: int, conf: float, draw_to: Path | None = None
         ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """What one would write by hand: decode, resize, forward, threshold, boxes back to the image."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    from accel_det.data import to_original
    from accel_det.engine.run import open_run
    from accel_det.predict_io import draw_png

    opened = open_run(run_dir, "best")
    model, dim, names = opened.model, opened.recipe.model.img_dim, opened.recipe.output_class_names
    results = []
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        images = []
        for f in chunk:
            with Image.open(f) as im:
                images.append(F.pil_to_tensor(im.convert("RGB")))
        x = torch.stack([F.resize(img, [dim, dim], antialias=True) for img in images]).float().div_(255)
        with torch.inference_mode():
            outputs = model(x)
        for f, img, det in zip(chunk, images, outputs):
            keep = det["scores"] >= conf
            h, w = img.shape[-2:]
            boxes = to_original(det["boxes"], (h, w), dim, False)[keep]
            scores, labels = det["scores"][keep], det["labels"][keep]
            results.append((boxes, scores, labels))
            if draw_to is not None:
                text = [f"{names[int(lab) - 1]} {float(s):.2f}" for lab, s in zip(labels, scores)]
                draw_png(img, boxes, text, draw_to / f"{f.stem}.png")
    return results


def check_same(bare_out: list[tuple[torch.Tensor, ...]], json_file: Path) -> int:
    preds = json.loads(json_file.read_text())
    assert len(preds) == len(bare_out)
    n = 0
    for (boxes, scores, labels), p in zip(bare_out, preds):
        dets = p["detections"]
        assert len(dets) == len(scores), (p["file"], len(dets), len(scores))
        if dets:
            assert torch.allclose(torch.tensor([d["box"] for d in dets]), boxes, atol=0.006), p["file"]
            assert torch.allclose(torch.tensor([d["score"] for d in dets]), scores, atol=6e-5), p["file"]
            assert [d["label"] for d in dets] == labels.tolist(), p["file"]
        n += len(dets)
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--conf", type=float, default=0.3, help="predict's default")
    ap.add_argument("--model", default="", help="model.name override (default: the demo recipe's)")
    ap.add_argument("--img-dim", type=int, default=0, help="model.img_dim override (default: the demo recipe's)")
    ap.add_argument("--workers", type=int, nargs="*", default=None,
                    help="predict --no-draw worker counts to time besides the default (e.g. 0 2)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="more recipe overrides for the run, e.g. eval.conf_thres=0.3 (lighter post-processing)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch.set_num_threads for this process, both sides alike (default: torch's own)")
    ap.add_argument("--write", action="store_true", help="append the section to BENCHMARKS.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from test_export import make_run_from  # the tests' random-run builder (calibrated BatchNorm)

    from accel_det.errors import DataError
    from accel_det.predict import predict
    from accel_det.predict_io import default_workers

    overrides = [f"model.name='{args.model}'"] * bool(args.model) + [f"model.img_dim={args.img_dim}"] * bool(
        args.img_dim) + list(args.set)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run_dir = make_run_from(REPO / "recipes" / "demo.toml", root, overrides)
        recipe = json.loads((run_dir / "recipe.json").read_text())
        files = make_images(root / "images", args.images)
        b, conf = args.batch_size, args.conf

        def run_predict(out: str, draw: bool, workers: int | None = None) -> None:
            try:
                predict(run_dir, [str(root / "images")], root / out, conf=conf, batch_size=b, workers=workers,
                        draw=draw)
            except DataError as exc:  # pragma: no cover - every generated image is readable
                raise SystemExit(f"predict failed: {exc}") from None

        variants: dict[str, Callable[[], Any]] = {
            "bare": lambda: bare(run_dir, files, b, conf),
            "predict --no-draw": lambda: run_predict("p_nodraw", False),
        }
        for w in args.workers or []:
            variants[f"predict --no-draw --workers {w}"] = lambda w=w: run_predict(f"p_nodraw_{w}", False, w)
        variants["bare + draw"] = lambda: bare(run_dir, files, b, conf, draw_to=root / "bare_drawn")
        variants["predict (drawing)"] = lambda: run_predict("p_draw", True)

        detections = check_same(bare(run_dir, files, b, conf), _json_of(run_predict, root, "p_check"))
        wall: dict[str, list[float]] = {k: [] for k in variants}
        cpu: dict[str, list[float]] = {k: [] for k in variants}
        loads = []
        for r in range(args.rounds + 1):  # round 0 warms up (file cache, first-call allocations)
            loads.append(os.getloadavg()[0])
            names = list(variants)
            for name in names[r % len(names):] + names[:r % len(names)]:  # rotated: no variant always goes first
                # each call starts without the previous calls' garbage pending: otherwise whichever call crosses
                # the threshold of a full collection (~0.2-0.3 s over torch's objects) pays for all of them, and
                # a fresh `accel-det predict` process starts clean too
                gc.collect()
                c0, t0 = _cpu_seconds(), time.perf_counter()
                variants[name]()
                if r:
                    wall[name].append(time.perf_counter() - t0)
                    cpu[name].append(_cpu_seconds() - c0)
            if r:
                print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in wall.items()), flush=True)
    n = args.images
    pairs = [("predict --no-draw", "bare"),
             *((f"predict --no-draw --workers {w}", "bare") for w in args.workers or []),
             ("predict (drawing)", "bare + draw"), ("predict (drawing)", "bare")]
    median = statistics.median
    cmd = "python benchmarks/predict.py " + " ".join(sys.argv[1:])
    model = recipe["model"]
    lines = [
        f"## Predict (benchmarks/predict.py), {dt.date.today().isoformat()}",
        "",
        f"Machine: {platform.machine()} ({_cpu_name()}), {len(os.sched_getaffinity(0))} cores, shared with other "
        f"sessions (1-min load average {min(loads):.1f}-{max(loads):.1f} at the round starts); torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads), python {platform.python_version()}. Measured "
        f"{_date()}. Command: `{cmd.strip()}`.",
        "",
        f"{model['name']} at {model['img_dim']} px (random weights, BatchNorm calibrated on noise; the run's "
        f"eval.conf_thres {recipe['eval']['conf_thres']}, max_det {recipe['eval']['max_det']}), {n} "
        f"JPEGs of 128-640 px, batch {b}, conf {conf} ({detections} detections in all), default workers here "
        f"{default_workers(torch.cuda.is_available())}. img/s = images / wall seconds of the whole call (model "
        f"opened from the run dir in both); CPU ms/img = user + sys of this process and its reaped children "
        f"(the DataLoader workers). {args.rounds} rounds after a warm-up round, the variants' order rotated each "
        "round, each call after a gc.collect() (no call pays a full collection for another's garbage).",
        "",
        "| variant | img/s (median) | img/s per round | CPU ms/img (median) |",
        "|---|---|---|---|",
        *(f"| {k} | {n / median(wall[k]):.1f} | {' / '.join(f'{n / s:.1f}' for s in wall[k])} | "
          f"{1000 * median(cpu[k]) / n:.1f} |" for k in variants),
        "",
        "Ratios: *of medians* = img/s median / img/s median; *paired* = the median over rounds of the two calls' "
        "ratio within a round (neighbours in time see the same load); *CPU* = bare's CPU time / predict's.",
        "",
        "| ratio | of medians | paired (min-max) | CPU |",
        "|---|---|---|---|",
        *(f"| {a} / {z} | {median(wall[z]) / median(wall[a]):.3f} | "
          f"{median(_paired(wall, a, z)):.3f} ({min(_paired(wall, a, z)):.2f}-{max(_paired(wall, a, z)):.2f}) | "
          f"{median(cpu[z]) / median(cpu[a]):.3f} |" for a, z in pairs),
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        with open(REPO / "BENCHMARKS.md", "a", encoding="utf-8") as f:
            f.write("\n" + text + "\n")


def _paired(wall: dict[str, list[float]], a: str, z: str) -> list[float]:
    return [tz / ta for ta, tz in zip(wall[a], wall[z])]


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _json_of(run_predict: Callable[[str, bool], None], root: Path, out: str) -> Path:
    run_predict(out, False)
    return root / out / "predictions.json"


def _date() -> str:
    return subprocess.run(["date", "-u", "+%Y-%m-%d %H:%M UTC"], capture_output=True, text=True).stdout.strip()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
