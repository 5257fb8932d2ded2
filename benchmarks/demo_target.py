"""The issue-4 target: the demo recipe reaches COCO AP50 >= 0.5 on its synthetic val split in <= 5 minutes
of training on this CPU. Runs ``python -m accel_det.train recipes/demo.toml`` in a fresh temp dir (data
generation included in the wall time) and reads the eval records of its metrics.jsonl.

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
        t0 = time.perf_counter()
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
    row = (f"| {dt.date.today().isoformat()} | {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
           f"| {' '.join(args.overrides) or '(as shipped)'} | {epochs} | {wall:.0f} s | {train_s:.0f} s "
           f"| {sum(ips) / len(ips):.1f} | {last['AP']:.3f} | {last['AP50']:.3f} |")
    print("evals:", [(e["epoch"], round(e["AP"], 3), round(e["AP50"], 3)) for e in evals])
    print(row)
    if args.write:
        path = REPO / "BENCHMARKS.md"
        text = path.read_text()
        head = "## Demo target (benchmarks/demo_target.py)"
        if head not in text:
            text = text.rstrip("\n") + (
                f"\n\n{head}\n\nTarget: COCO AP50 >= 0.5 on the synthetic val split within 5 minutes of training, "
                "CPU. Wall = the whole command (data generation, evals, checkpoints); train = the epochs alone.\n\n"
                "| date | machine | overrides | epochs | wall | train | mean img/s | AP | AP50 |\n"
                "|---|---|---|---|---|---|---|---|---|\n")
        path.write_text(text.rstrip("\n") + "\n" + row + "\n")


if __name__ == "__main__":
    main()
