"""Overrides that turn recipes/demo.toml into a tiny, fast run (shared by the end-to-end tests)."""

from __future__ import annotations

from pathlib import Path


def tiny_overrides(out_root: Path, data_root: Path, **extra: object) -> list[str]:
    """24 train / 9 val (odd: a padded last batch with 2 processes) 64 px images, FaceBoxes at 128 px."""
    base = {
        "output.root": f"'{out_root}'",
        "data.root": f"'{data_root}'",
        "data.synthetic.num_train": 24,
        "data.synthetic.num_val": 9,
        "data.synthetic.img_size": 64,
        "data.batch_size": 8,
        "data.num_workers": 0,
        "model.name": "'faceboxes'",
        "model.img_dim": 128,
        "train.max_epoch": 1,
        "train.log_freq": 1,
        "scheduler.warmup_iters": 2,
        "eval.freq": 1,
        "output.checkpoint_freq": 1,
        "output.report": "false",  # ~2 s of figures per run; tests/test_report.py turns it on
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
