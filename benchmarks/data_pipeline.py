"""Data pipeline throughput: decode + augments + collate, per augment and per shipped recipe's augment set,
with 0/1/2 DataLoader workers, against the training rate of the same recipe.

    python benchmarks/data_pipeline.py                      # demo data at 128 px, every augment, SSD set
    python benchmarks/data_pipeline.py --train-rate         # also time training steps for the ratio
    python benchmarks/data_pipeline.py --profile            # cProfile of the SSD set, single process
    python benchmarks/data_pipeline.py --augments hflip mosaic,hflip   # only these sets (comma-separated)

The data is the demo's synthetic VOC folder (generated on first use). A "pass" iterates the train loader
for ``--batches`` batches (after one warm-up batch, so worker start-up is not counted); img/s = images /
seconds of that loop. The ratio the issue asks for is pipeline img/s / training img/s with the same recipe.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from accel_det.config_io import load_recipe  # noqa: E402
from accel_det.data.builder import build_datasets, build_train_loader  # noqa: E402

SSD_SET = ["photometric", "zoom_out", "iou_crop", "hflip"]
SINGLE = [
    "mosaic", "photometric", "color_jitter", "grayscale", "zoom_out", "iou_crop", "scale_jitter", "hflip", "vflip"
]


def recipe_for(augments: list[str], workers: int, batch: int, extra: list[str]):
    aug = "[" + ",".join(f'"{a}"' for a in augments) + "]"
    return load_recipe(
        ROOT / "recipes" / "demo.toml",
        [f"data.augments={aug}", f"data.num_workers={workers}", f"data.batch_size={batch}",
         f"data.root={ROOT / 'data' / 'synthetic_shapes'}", *extra],
    )


def pipeline_rate(augments: list[str], workers: int, batch: int, batches: int, extra: list[str]) -> float:
    recipe = recipe_for(augments, workers, batch, extra)
    train_ds, _ = build_datasets(recipe)
    loader = build_train_loader(recipe, train_ds)
    train_ds.set_epoch(0)
    it = iter(loader)
    next(it)  # warm-up: worker start-up, first decode
    n, t0 = 0, time.perf_counter()
    for _ in range(batches):
        try:
            images, _targets = next(it)
        except StopIteration:
            train_ds.set_epoch(1)
            it = iter(loader)
            images, _targets = next(it)
        n += images.shape[0]
    return n / (time.perf_counter() - t0)


def train_rate(batch: int, steps: int, extra: list[str]) -> float:
    """Training img/s of the demo's model on fixed batches (forward + loss + backward + step): the rate the
    pipeline has to keep up with."""
    from accel_det.engine.model_speed import apply_memory_format  # noqa: PLC0415
    from accel_det.models import build_model  # noqa: PLC0415

    recipe = recipe_for(["hflip"], 0, batch, extra)
    train_ds, _ = build_datasets(recipe)
    loader = build_train_loader(recipe, train_ds)
    train_ds.set_epoch(0)
    images, targets = next(iter(loader))
    model, _ = build_model(recipe)
    model = apply_memory_format(model, recipe)  # as the trainer runs it (train.channels_last)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = images.float() / 255.0

    def step() -> None:
        losses = model(x, targets)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # training gets the whole machine; the pipeline rows one thread
    try:
        step()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        return steps * batch / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--repeats", type=int, default=3, help="median of this many passes")
    p.add_argument("--train-rate", action="store_true", help="also time training steps of the demo model")
    p.add_argument("--profile", action="store_true", help="cProfile the SSD set with 0 workers and stop")
    p.add_argument("--only-sets", action="store_true", help="skip the per-augment rows")
    p.add_argument("--augments", nargs="+", metavar="SET",
                   help="time only these augment sets, each comma-separated ('' = none), instead of the default rows")
    p.add_argument("overrides", nargs="*", help="extra recipe overrides, e.g. model.img_dim=320")
    args = p.parse_args()
    torch.set_num_threads(1)  # what a DataLoader worker gets; the main process matches for 0 workers

    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        rate = pipeline_rate(SSD_SET, 0, args.batch, args.batches, args.overrides)
        prof.disable()
        print(f"SSD set, 0 workers: {rate:.0f} img/s (under cProfile)")
        pstats.Stats(prof).sort_stats("cumulative").print_stats(40)
        return

    rows: list[tuple[str, list[str]]] = [("none (decode + resize + collate)", [])]
    if not args.only_sets:
        rows += [(a, [a]) for a in SINGLE]
    rows += [("demo.toml: hflip", ["hflip"]), ("SSD set: " + " + ".join(SSD_SET), SSD_SET)]
    if args.augments is not None:
        sets = [[a for a in s.split(",") if a] for s in args.augments]
        rows = [(" + ".join(s) or "none (decode + resize + collate)", s) for s in sets]
    print(f"cpu: {os.cpu_count()} cores, torch {torch.__version__}, batch {args.batch}, {args.batches} batches")
    trate = None
    if args.train_rate:
        trate = statistics.median(train_rate(args.batch, 10, args.overrides) for _ in range(args.repeats))
        print(f"training (demo model, 1 process, {os.cpu_count()} threads): {trate:.1f} img/s")
    header = "| augments | " + " | ".join(f"{w} workers img/s" for w in args.workers) + " |"
    print(header)
    print("|---" * (len(args.workers) + 1) + "|")
    for name, augments in rows:
        cells = []
        for w in args.workers:
            rate = statistics.median(
                pipeline_rate(augments, w, args.batch, args.batches, args.overrides) for _ in range(args.repeats)
            )
            cells.append(f"{rate:.0f}" + (f" ({rate / trate:.1f}x)" if trate else ""))
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
