"""Native detector speed on this machine: FaceBoxes inference at 1024 px (batch 1) and train-step throughput.

    python benchmarks/native_speed.py [--write]        # --write appends the rows to BENCHMARKS.md

On a CUDA machine it also times fp16 autocast against fp32 inference (the same process, same model).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import time
from pathlib import Path

import torch

from accel_det.config_io import load_recipe
from accel_det.models import build_model


def _timeit(fn, warmup: int, iters: int, sync) -> float:
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t0) / iters


def infer_img_per_s(name: str, img_dim: int, device: str, dtype: torch.dtype | None, iters: int) -> float:
    recipe = load_recipe(None, [f"model.name='{name}'", f"model.img_dim={img_dim}", "data.class_names=['face']",
                                "eval.conf_thres=0.05"])
    model, _ = build_model(recipe)
    model.to(device).eval()
    x = torch.rand(1, 3, img_dim, img_dim, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step() -> None:
        with torch.inference_mode(), torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            model(x)

    return 1.0 / _timeit(step, warmup=3, iters=iters, sync=sync)


def train_img_per_s(name: str, img_dim: int, batch: int, iters: int) -> float:
    recipe = load_recipe(None, [f"model.name='{name}'", f"model.img_dim={img_dim}"])
    model, _ = build_model(recipe)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, img_dim, img_dim, generator=g)
    s = img_dim
    targets = [{"boxes": torch.tensor([[0.1 * s, 0.1 * s, 0.4 * s, 0.5 * s], [0.5 * s, 0.4 * s, 0.9 * s, 0.8 * s]]),
                "labels": torch.tensor([1, 2])} for _ in range(batch)]

    def step() -> None:
        loss = sum(model(x, targets).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return batch / _timeit(step, warmup=2, iters=iters, sync=lambda: None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    rows = []
    date = dt.date.today().isoformat()
    machine = f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, torch {torch.__version__}"
    v = infer_img_per_s("faceboxes", 1024, "cpu", None, args.iters)
    rows.append(("faceboxes inference 1024 px, batch 1, CPU fp32", f"{v:.1f} img/s"))
    if torch.cuda.is_available():
        f32 = infer_img_per_s("faceboxes", 1024, "cuda", None, 50)
        f16 = infer_img_per_s("faceboxes", 1024, "cuda", torch.float16, 50)
        rows.append((f"faceboxes inference 1024 px, batch 1, {torch.cuda.get_device_name(0)} fp32", f"{f32:.1f} img/s"))
        rows.append(("... fp16 autocast", f"{f16:.1f} img/s ({f16 / f32:.2f}x fp32)"))
    for name, dim in (("faceboxes", 128), ("ssdlite_mobilenet_v3", 128), ("ssdlite_resnet18", 128)):
        v = train_img_per_s(name, dim, 16, max(3, args.iters // 2))
        rows.append((f"{name} train step {dim} px, batch 16, CPU fp32", f"{v:.1f} img/s"))
    for what, val in rows:
        print(f"{what}: {val}")
    if args.write:
        path = Path(__file__).parents[1] / "BENCHMARKS.md"
        text = path.read_text() if path.exists() else "# Benchmarks\n"
        block = [f"\n## Native detector speed (benchmarks/native_speed.py), {date}\n", f"Machine: {machine}.\n",
                 "| what | result |", "|---|---|", *[f"| {w} | {v} |" for w, v in rows]]
        path.write_text(text.rstrip("\n") + "\n" + "\n".join(block) + "\n")


if __name__ == "__main__":
    main()
