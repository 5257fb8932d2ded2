"""The demo's time to accuracy: ``python -m accel_det.train recipes/demo.toml`` in a fresh temp dir (data
generation, start-up, evaluations, checkpoints, plots all in the wall time), then its metrics.jsonl: the whole
command's wall clock, the seconds from the command's start to the first evaluation with COCO AP50 >= 0.9 (the
issue-19 target: <= 90 s, with the same or a better final AP), and the final AP/AP50.

    python benchmarks/demo_target.py [--write] [key=value ...]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0, start = time.perf_counter(), time.time()
        subprocess.run([sys.executable, "-m", "accel_det.train", str(REPO / "recipes/demo.toml"), *args.overrides],
                       cwd=tmp, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        run = Path(tmp) / "runs/demo/round1"
        events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_s = sum(e["seconds"] for e in events if e["event"] == "epoch")
    evals = [e for e in events if e["event"] == "eval"]
    last = evals[-1]
    epochs = max(e["epoch"] for e in events if e["event"] == "epoch")
    ips = [e["img_per_s"] for e in events if e["event"] == "train"]
    reached = next((e["time"] - start for e in evals if e["AP50"] >= 0.9), None)
    row = (f"| {dt.date.today().isoformat()} | {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
           f"| {' '.join(args.overrides) or '(as shipped)'} | {epochs} | {wall:.0f} s | {train_s:.0f} s "
           f"| {sum(ips) / len(ips):.1f} | {last['AP']:.3f} | {last['AP50']:.3f} "
           f"| {'never' if reached is None else f'{reached:.0f} s'} |")
    print("evals (epoch, AP, AP50, seconds from start):",
          [(e["epoch"], round(e["AP"], 3), round(e["AP50"], 3), round(e["time"] - start)) for e in evals])
    print(f"AP50 >= 0.9 after {reached:.0f} s" if reached is not None else "AP50 never reached 0.9")
    print(row)
    if args.write:
        path = REPO / "BENCHMARKS.md"
        text = path.read_text()
        head = "## Demo target (benchmarks/demo_target.py)"
        if head not in text:
            text = text.rstrip("\n") + (
                f"\n\n{head}\n\nTarget: COCO AP50 >= 0.5 on the synthetic val split within 5 minutes of training, "
                "CPU. Wall = the whole command (data generation, evals, checkpoints); train = the epochs alone.\n\n"
                "| date | machine | overrides | epochs | wall | train | mean img/s | AP | AP50 | to AP50 0.9 |\n"
                "|---|---|---|---|---|---|---|---|---|---|\n")
        path.write_text(text.rstrip("\n") + "\n" + row + "\n")


if __name__ == "__main__":
    main()
