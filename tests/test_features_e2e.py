"""The seeds' training features switched on together, through the real command: a mixed second dataset with its
own val split, stages, letterbox, EMA, warmup momentum and bias LR, SyncBN (a note on one process), recompute,
a loss scale, the profiler, a user callback and an NMS time limit; then evaluate and predict serve the EMA.

Subprocess (the callback is imported from the working directory, as a user's would be), tiny and CPU-only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from procs import run
from safetensors.torch import load_file
from tiny_run import tiny_overrides

REPO = Path(__file__).parents[1]
DEMO = REPO / "recipes" / "demo.toml"

pytestmark = pytest.mark.slow

CALLBACK = '''
import json
from pathlib import Path


class Recorder:
    """A user hook: records what it is called with."""

    def __init__(self, path, run_dir=None):
        self.path, self.run_dir, self.calls = Path(path), run_dir, []

    def after_epoch(self, state):
        self.calls.append(["after_epoch", state.epoch, state.global_step])
        self.path.write_text(json.dumps(self.calls))

    def after_train(self, state):
        self.calls.append(["after_train", state.epoch, str(self.run_dir)])
        self.path.write_text(json.dumps(self.calls))
'''


def _everything(tmp: Path) -> list[str]:
    return tiny_overrides(tmp / "runs", tmp / "data", **{
        "model.name": "'ssdlite_mobilenet_v3'", "model.img_dim": 128, "data.batch_size": 4,
        "train.max_epoch": 2, "eval.freq": 1,
        "data.mix": f"{{rate = 0.3, root = '{tmp / 'data2'}'}}",
        "data.stages": "[{epochs = 1, augments = []}, {epochs = 1, augments = ['hflip', 'scale_jitter']}]",
        "data.letterbox": "true",
        "train.ema": "{enabled = true, decay = 0.9, warmup = 2}",
        "scheduler.warmup_iters": 4, "scheduler.warmup_momentum": 0.5, "scheduler.warmup_bias_lr": 0.05,
        "optimizer.name": "'sgd'", "optimizer.lr": 0.01,
        "model.sync_bn": "true", "model.recompute": 2,
        "train.loss_scale": "{init = 1024.0, growth_interval = 100}",
        "train.profile_steps": "[2, 3]",
        "train.callbacks": "[{target = 'my_hooks:Recorder', kwargs = {path = 'calls.json'}}]",
        "eval.nms_time_limit": 10.0,
        "output.checkpoint_every_steps": 5,
    })


def test_every_seed_feature_on_trains_evaluates_and_predicts(tmp_path: Path) -> None:
    (tmp_path / "my_hooks.py").write_text(CALLBACK)
    res = run([sys.executable, "-m", "accel_det.train", DEMO, *_everything(tmp_path)], tmp_path)
    out, run_dir = res.stdout, tmp_path / "runs" / "demo" / "round1"
    assert "stage 1/2 from epoch 1: augments none (resize only)" in out
    assert "stage 2/2 from epoch 2: augments hflip, scale_jitter" in out
    assert "SyncBatchNorm" in out or "sync_bn" in out  # one process: a note, no conversion
    assert "profile of optimizer steps 2-3" in out and list((run_dir / "profile").glob("trace_steps_2-3_rank0.json"))

    events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [(e["split"], e["epoch"]) for e in events if e["event"] == "eval"]
    assert evals == [("val", 1), ("val2", 1), ("val", 2), ("val2", 2)]
    assert (run_dir / "eval" / "epoch_0002_val2.json").is_file()
    momentum = [e["momentum"] for e in events if e["event"] == "train"]
    assert momentum[0] < momentum[-1] == pytest.approx(0.9)  # ramped from 0.5 during warmup
    # the mix makes an epoch round(24 / (1 - 0.3)) = 34 samples: 8 batches of 4
    assert json.loads((tmp_path / "calls.json").read_text()) == [
        ["after_epoch", 1, 8], ["after_epoch", 2, 16], ["after_train", 2, str(run_dir)]]

    # EMA: checkpoints carry its weights, and they are the run's final weights
    last = run_dir / "checkpoints" / (run_dir / "checkpoints" / "last").read_text().strip()
    ema, final = load_file(str(last / "ema.safetensors")), load_file(str(run_dir / "model.safetensors"))
    assert ema.keys() == final.keys() and all(torch.equal(ema[k], final[k]) for k in ema)
    raw = load_file(str(last / "model.safetensors"))
    assert any(not torch.equal(raw[k], ema[k]) for k in ema if raw[k].is_floating_point())

    # evaluate serves the EMA weights and scores both val splits like the run did
    run([sys.executable, "-m", "accel_det.evaluate", run_dir, "--checkpoint", "last"], tmp_path)
    result = json.loads((run_dir / "eval" / "evaluate_last.json").read_text())
    assert result["weights"].endswith("ema.safetensors")
    assert result["AP"] == pytest.approx(json.loads((run_dir / "eval" / "epoch_0002.json").read_text())["AP"])
    assert (run_dir / "eval" / "evaluate_last_val2.json").is_file()
    image = sorted(next((tmp_path / "data").glob("*/JPEGImages")).glob("*.png"))[0]
    run([sys.executable, "-m", "accel_det.predict", run_dir, image, "--out", tmp_path / "preds", "--conf", "0"],
        tmp_path)
    assert json.loads((tmp_path / "preds" / "predictions.json").read_text())[0]["detections"]

    # one more epoch: the resumed run starts in the right stage, and says so
    res = run([sys.executable, "-m", "accel_det.train", DEMO, *_everything(tmp_path), "train.max_epoch=3",
               "eval.compute_map=false"], tmp_path)
    assert "resumed from" in res.stdout and "stage 2/2 from epoch 3: augments hflip, scale_jitter" in res.stdout
