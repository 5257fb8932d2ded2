"""Framework cost: accel_det's training loop against a bare torch loop on the same model, data and batch.

    python benchmarks/overhead.py                       # tv ssdlite320, batch 8, 2 workers, no augments, 5 pairs
    python benchmarks/overhead.py --pairs 7 model.name=ssdlite_mobilenet_v3 model.img_dim=128

Each side runs as its own process (``--side bare`` / ``--side accel``), the two alternate (bare, accel, bare,
accel, ...) so that a slow phase of this shared machine hits both, and the ratio is the median of the per-pair
ratios. Both sides: glibc malloc tuned the same way (accel_det.train.tune_malloc), the recipe's model
(``build_model``, ``train.channels_last``), optimizer and LR schedule (``build_optimizer``/``build_scheduler``),
the recipe's train DataLoader (``build_train_loader``: same dataset, transforms, collate, workers), uint8 batches
turned to float on the device. img/s = images of epochs 2..N / their seconds (epoch 1 holds start-up and worker
spawn). The accel side is the real command (``python -m accel_det.train``) reading its ``metrics.jsonl`` epoch
events; it evaluates and checkpoints once, at the end, outside the timed epochs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE = [
    "model.name=tv_ssdlite320_mobilenet_v3_large", "model.img_dim=320", "model.init=default",
    "data.batch_size=8", "data.num_workers=2", "data.augments=[]", "data.synthetic.num_train=160",
    "data.synthetic.num_val=16", "optimizer.name=sgd", "optimizer.lr=0.01", "optimizer.momentum=0.9",
    "scheduler.name=cosine", "scheduler.warmup_iters=0", "train.log_freq=10", "train.ema.enabled=false",
]


def _overrides(args: argparse.Namespace, root: Path) -> list[str]:
    return [*BASE, f"train.max_epoch={args.epochs}", f"eval.freq={args.epochs}",
            f"output.checkpoint_freq={args.epochs}", f"data.root={ROOT / 'data' / 'synthetic_shapes'}",
            f"output.root={root}", *args.overrides]


def bare(args: argparse.Namespace) -> None:
    """The loop a user would write: no Accelerator, no hooks, no logging, no gradient norm."""
    from accel_det.train import tune_malloc

    tune_malloc()
    import torch

    from accel_det.config_io import load_recipe
    from accel_det.data import build_dataset, build_train_loader
    from accel_det.engine.model_speed import apply_memory_format
    from accel_det.models import build_model
    from accel_det.optim import build_optimizer, build_scheduler

    recipe = load_recipe(ROOT / "recipes" / "demo.toml", _overrides(args, Path(args.root)))
    torch.manual_seed(recipe.train.seed)
    train_set = build_dataset(recipe, "train")
    loader = build_train_loader(recipe, train_set)
    model, _ = build_model(recipe)
    model = apply_memory_format(model, recipe)  # the same memory format as the accel side (train.channels_last)
    model.train()
    optimizer = build_optimizer(model, recipe.optimizer)
    scheduler = build_scheduler(optimizer, recipe.scheduler, len(loader), recipe.train.max_epoch)
    images_timed, seconds = 0, 0.0
    for epoch in range(recipe.train.max_epoch):
        train_set.set_epoch(epoch)
        t0 = time.perf_counter()
        n = 0
        for images, targets in loader:
            losses = model(images.float().div_(255), targets)
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            n += images.shape[0]
        if epoch > 0:
            images_timed, seconds = images_timed + n, seconds + time.perf_counter() - t0
    print(json.dumps({"img_per_s": images_timed / seconds}))


def accel(args: argparse.Namespace) -> None:
    root = Path(args.root)
    cmd = [sys.executable, "-m", "accel_det.train", str(ROOT / "recipes" / "demo.toml"), *_overrides(args, root)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    metrics = next(root.rglob("metrics.jsonl"))
    epochs = [e for e in map(json.loads, metrics.read_text().splitlines()) if e.get("event") == "epoch"]
    timed = [e for e in epochs if e["epoch"] > 1]
    images = sum(e["img_per_s"] * e["seconds"] for e in timed)
    print(json.dumps({"img_per_s": images / sum(e["seconds"] for e in timed)}))


def _side(side: str, args: argparse.Namespace) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, __file__, "--side", side, "--root", tmp, "--epochs", str(args.epochs), *args.overrides]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["img_per_s"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is not timed")
    p.add_argument("--side", choices=["bare", "accel"], help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="recipe overrides on top of the benchmark's (applied to both)")
    args = p.parse_args()
    if args.side:
        (bare if args.side == "bare" else accel)(args)
        return
    print(f"cpu: {os.cpu_count()} cores; overrides: {' '.join(BASE + args.overrides)}", flush=True)
    ratios = []
    for i in range(args.pairs):
        b, a = _side("bare", args), _side("accel", args)
        ratios.append(a / b)
        print(f"pair {i + 1}: bare {b:.2f} img/s, accel_det {a:.2f} img/s, ratio {a / b:.3f}", flush=True)
    print(f"median ratio accel_det / bare: {statistics.median(ratios):.3f} over {args.pairs} pairs "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    main()
