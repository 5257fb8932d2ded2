"""Training-step cost of ``train.channels_last`` and ``train.compile`` per model (engine/model_speed.py).

    python benchmarks/model_speed.py ssdlite_mobilenet_v3 128 16          # model, img_dim, batch
    python benchmarks/model_speed.py tv_ssdlite320_mobilenet_v3_large 320 8
    python benchmarks/model_speed.py ssdlite_mobilenet_v3 128 16 --compile

One thread, CPU seconds (``time.process_time``) per training step (forward + loss + backward + SGD step) on one
fixed batch of the demo's synthetic images: CPU time, unlike wall time, barely moves when other jobs share the
machine. NCHW is timed before and after channels_last, so a drift shows; ``--compile`` adds a channels_last +
``torch.compile`` row (inductor; the compile time of its first two steps is printed, it is minutes on CPU).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from accel_det.config_io import load_recipe  # noqa: E402
from accel_det.data import build_dataset, build_train_loader  # noqa: E402
from accel_det.models import build_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("img_dim", type=int)
    p.add_argument("batch", type=int)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    recipe = load_recipe(ROOT / "recipes" / "demo.toml", [
        f"model.name={args.model}", f"model.img_dim={args.img_dim}", f"data.batch_size={args.batch}",
        "data.num_workers=0", f"data.root={ROOT / 'data' / 'synthetic_shapes'}",
    ])
    train_set = build_dataset(recipe, "train")
    train_set.set_epoch(0)
    images, targets = next(iter(build_train_loader(recipe, train_set)))
    x = images.float() / 255

    def ms_per_step(channels_last: bool, compiled: bool = False) -> float:
        torch.manual_seed(0)
        model, _ = build_model(recipe)
        model.train()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        if compiled:
            (getattr(model, "net", None) or model.backbone).compile()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step() -> None:
            loss = sum(model(x, targets).values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        t0 = time.perf_counter()
        step()
        step()
        if compiled:
            print(f"  compile + first 2 steps: {time.perf_counter() - t0:.0f} s wall", flush=True)
        t0 = time.process_time()
        for _ in range(args.steps):
            step()
        return (time.process_time() - t0) / args.steps * 1e3

    a, b, c = ms_per_step(False), ms_per_step(True), ms_per_step(False)
    print(f"{args.model} {args.img_dim}px batch {args.batch}: NCHW {a:.0f}/{c:.0f} ms, channels_last {b:.0f} ms "
          f"-> {(a + c) / 2 / b:.2f}x", flush=True)
    if args.compile:
        d = ms_per_step(True, compiled=True)
        print(f"  channels_last + torch.compile {d:.0f} ms -> {b / d:.2f}x vs channels_last eager")


if __name__ == "__main__":
    main()
