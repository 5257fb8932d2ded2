"""``model.recompute`` (issue 16): peak RSS and step time of CPU training with and without activation checkpointing.

    python benchmarks/recompute_memory.py [--steps N] [--models faceboxes,ssdlite_resnet18,...] [--mmap-threshold B]

Each setting (model, img_dim, batch, ``model.recompute``) runs in a fresh subprocess, so one setting's
allocations cannot lift the next one's peak. The child builds the model the real way
(``accel_det.config_io.load_recipe`` + ``accel_det.models.build_model``, seeded), runs N training steps
(forward + loss + backward + SGD momentum step, like ``engine.trainer.train_step`` without Accelerate) on a
fixed random batch, and reports:

- *peak RSS*: ``getrusage(RUSAGE_SELF).ru_maxrss`` at the end: the whole process (Python, torch, model, data,
  optimizer state, activations);
- *setup RSS*: the resident set just before the first step (model, data and libraries), read from
  ``/proc/self/status``; *train peak* = peak - setup, what the steps themselves add (activations, gradients,
  momentum buffers, allocator slack), the part recompute acts on;
- *saved*: what autograd holds for backward at the end of one more forward (after the timed steps, so it
  cannot lift the peak), counted with ``saved_tensors_hooks`` (distinct storages): allocator-independent, it
  shows what recompute removes; the recomputed stages' own saved tensors live only inside their backward;
- *step*: mean and min wall time of steps 2..N (step 1 also allocates the momentum buffers); "vs 0" compares the
  mins, which other jobs on the machine disturb less (the *load* column is the 1-minute load average at the end);
- the loss of step 1 (the forward is the same with and without recompute: it must be bit-identical) and of
  step N (it depends on N-1 updates, so it also checks that the recomputed gradients are the same).

The parent prints a Markdown table and exits non-zero when a model's step-1 loss differs between settings.

Peak RSS is what glibc malloc kept mapped, not the live tensor bytes: freed blocks under its (dynamic, up to
32 MiB) mmap threshold stay in the heap, so the allocation order can matter as much as the live bytes.
``--mmap-threshold 65536`` sets ``MALLOC_MMAP_THRESHOLD_`` in the children: every tensor over 64 KiB is its own
mapping, returned on free, so the peak RSS follows the live bytes (the page faults cost time, so such a run's
step times are not the training's).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

# (model, img_dim, batch, recompute values): realistic training sizes that keep a step around a second on a
# 2-core CPU; FaceBoxes at its native 1024 px with a smaller batch. All three have 5 stages
# (accel_det.catalog); 2 = the two highest-resolution ones (FaceBoxes: the two RDCL convs).
SETTINGS: list[tuple[str, int, int, tuple[int, ...]]] = [
    ("faceboxes", 1024, 4, (0, 2, 5)),
    ("ssdlite_mobilenet_v3", 320, 8, (0, 2, 5)),
    ("ssdlite_resnet18", 320, 8, (0, 2, 5)),
]


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def child(name: str, img_dim: int, batch: int, recompute: int, steps: int) -> dict[str, object]:
    import torch

    from accel_det.config_io import load_recipe
    from accel_det.models import build_model

    recipe = load_recipe(
        None,
        [
            f"model.name='{name}'",
            f"model.img_dim={img_dim}",
            f"model.recompute={recompute}",
            "data.class_names=['a', 'b', 'c']",
        ],
    )
    torch.manual_seed(0)
    model, _ = build_model(recipe)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, img_dim, img_dim, generator=g)
    s = img_dim
    boxes = torch.tensor([[0.1, 0.1, 0.4, 0.5], [0.5, 0.4, 0.9, 0.8], [0.05, 0.6, 0.2, 0.75]]) * s
    targets = [{"boxes": boxes.clone(), "labels": torch.tensor([1, 2, 3])} for _ in range(batch)]
    setup_kib, setup_peak_kib = _rss_kib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    losses, times = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = sum(model(x, targets).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del loss
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = sum(model(x, targets).values())
    del loss
    return {
        "peak_kib": peak_kib,
        "saved_mib": sum(saved.values()) / 2**20,
        "setup_kib": setup_kib,
        "setup_peak_kib": setup_peak_kib,
        "step_s": sum(times[1:]) / max(1, len(times) - 1),
        "min_step_s": min(times[1:] or times),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "threads": torch.get_num_threads(),
        "load": os.getloadavg()[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--models", default=",".join(m for m, *_ in SETTINGS), help="comma-separated subset")
    ap.add_argument("--mmap-threshold", type=int, help="MALLOC_MMAP_THRESHOLD_ for the children (bytes)")
    ap.add_argument("--child", nargs=4, metavar=("MODEL", "IMG_DIM", "BATCH", "RECOMPUTE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        name, img_dim, batch, recompute = args.child
        print(json.dumps(child(name, int(img_dim), int(batch), int(recompute), args.steps)))
        return

    wanted = args.models.split(",")
    env = dict(os.environ)
    if args.mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    print(
        f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}, {os.cpu_count()} cores", file=sys.stderr
    )
    rows, mismatch, t_all = [], [], time.perf_counter()
    for name, img_dim, batch, values in SETTINGS:
        if name not in wanted:
            continue
        base = None
        for n in values:
            t0 = time.perf_counter()
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--steps",
                    str(args.steps),
                    "--child",
                    name,
                    str(img_dim),
                    str(batch),
                    str(n),
                ],
                check=True,
                capture_output=True,
                text=True,
                env=env,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{name} recompute={n}: {json.dumps(r)} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
            if r["setup_peak_kib"] > r["peak_kib"] - 1024:
                print(f"  note: the setup peak ({r['setup_peak_kib']} KiB) is close to the whole peak", file=sys.stderr)
            train = (r["peak_kib"] - r["setup_kib"]) / 1024
            if base is None:
                base = r
                vs_mem, vs_time = "-", "-"
            else:
                vs_mem = f"{train / ((base['peak_kib'] - base['setup_kib']) / 1024) - 1:+.0%}"
                vs_time = f"{r['min_step_s'] / base['min_step_s'] - 1:+.0%}"
                if r["first_loss"] != base["first_loss"]:
                    mismatch.append(f"{name} recompute={n}: {r['first_loss']!r} != {base['first_loss']!r}")
            rows.append(
                f"| {name} | {img_dim} | {batch} | {n} | {r['saved_mib']:.0f} | {r['peak_kib'] / 1024:.0f} "
                f"| {r['setup_kib'] / 1024:.0f} | {train:.0f} | {vs_mem} | {r['step_s']:.2f} | {r['min_step_s']:.2f} "
                f"| {vs_time} | {r['load']:.1f} | {r['first_loss']!r} | {r['last_loss']!r} |"
            )
    print(
        f"\n{args.steps} steps per setting, {time.perf_counter() - t_all:.0f} s in all; load average after: "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}\n"
    )
    print(
        "| model | img_dim | batch | recompute | saved MiB | peak RSS MiB | setup RSS MiB | train peak MiB | mem vs 0 "
        "| step s mean | step s min | time vs 0 | load | loss step 1 | loss step N |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if mismatch:
        sys.exit("step-1 loss differs with recompute:\n" + "\n".join(mismatch))


if __name__ == "__main__":
    main()
