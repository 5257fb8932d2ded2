"""End to end through ``python -m accel_det.train`` in a subprocess: run dir contents, resume, evaluate, predict.

Tiny on purpose: 24 synthetic 64 px train images, an odd number (9) of val images, the fast FaceBoxes net.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny_run import tiny_overrides

REPO = Path(__file__).parents[1]
DEMO = REPO / "recipes" / "demo.toml"


def _overrides(tmp: Path, **extra: object) -> list[str]:
    return tiny_overrides(tmp / "runs", tmp / "data", **extra)


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=600)
    assert res.returncode == 0, f"{args}\nstdout:\n{res.stdout[-3000:]}\nstderr:\n{res.stderr[-3000:]}"
    return res


def _events(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == kind]


@pytest.mark.slow
def test_train_resume_evaluate_predict(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "demo" / "round1"
    _run(["-m", "accel_det.train", str(DEMO), *_overrides(tmp_path, **{"log.trackers": "['tensorboard']"})],
         cwd=tmp_path)
    # trackers name the project after the mission (tensorboard/<mission>/) and the run after mission and round
    assert list((run_dir / "tensorboard" / "demo").glob("events.out.tfevents.*")), "tensorboard wrote nothing"

    for name in ("recipe.json", "env.json", "log.txt", "metrics.jsonl", "model.safetensors"):
        assert (run_dir / name).is_file(), name
    env = json.loads((run_dir / "env.json").read_text())
    assert env["accelerate"]["num_processes"] == 1 and env["effective_batch"] == 8
    evals = _events(run_dir, "eval")
    assert len(evals) == 1 and evals[0]["num_images"] == 9 and 0 <= evals[0]["AP50"] <= 1
    assert (run_dir / "eval" / "epoch_0001.json").is_file()
    preds = json.loads((run_dir / "eval" / "predictions_epoch_0001.json").read_text())
    assert preds and {"image_id", "category_id", "bbox", "score"} <= set(preds[0])
    assert (run_dir / "checkpoints" / "last").read_text().strip() == "epoch_0001"
    state = json.loads((run_dir / "checkpoints" / "epoch_0001" / "trainer_state.json").read_text())
    assert state["epoch"] == 1 and state["global_step"] == 3  # ceil(24 / 8)

    # resume="auto" picks the checkpoint up and continues the step count and the LR schedule
    res = _run(["-m", "accel_det.train", str(DEMO), *_overrides(tmp_path, **{"train.max_epoch": 2})], cwd=tmp_path)
    assert "resumed from" in res.stdout
    steps = [r["step"] for r in _events(run_dir, "train")]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert (run_dir / "checkpoints" / "last").read_text().strip() == "epoch_0002"
    ckpt = run_dir / "checkpoints" / "epoch_0002"
    assert json.loads((ckpt / "trainer_state.json").read_text())["steps_per_epoch"] == 3
    assert json.loads((ckpt / "recipe.json").read_text())["train"]["max_epoch"] == 2

    # evaluate CLI on the run dir
    res = _run(["-m", "accel_det.cli", "evaluate", str(run_dir), "--checkpoint", "last"], cwd=tmp_path)
    result = json.loads((run_dir / "eval" / "evaluate_last.json").read_text())
    assert result["num_images"] == 9
    last = json.loads((run_dir / "eval" / "epoch_0002.json").read_text())
    assert result["AP"] == pytest.approx(last["AP"], abs=1e-9)

    # predict CLI: JSON + one PNG per image, same size as the input
    images = sorted(next((tmp_path / "data").glob("*/JPEGImages")).glob("*.png"))[:3]
    out = tmp_path / "preds"
    _run(["-m", "accel_det.cli", "predict", str(run_dir), *map(str, images), "--out", str(out), "--conf", "0.0"],
         cwd=tmp_path)
    pred = json.loads((out / "predictions.json").read_text())
    assert len(pred) == 3
    for rec, img in zip(pred, images):
        with Image.open(out / rec["drawn"]) as drawn, Image.open(img) as src:
            assert drawn.size == src.size

    # a corrupt checkpoint stops the resume with one line naming it, and leaves the run dir as it was
    weights = run_dir / "checkpoints" / "epoch_0002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    res = subprocess.run([sys.executable, "-m", "accel_det.train", str(DEMO),
                          *_overrides(tmp_path, **{"train.max_epoch": 3})],
                         capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert res.returncode == 1
    assert res.stderr.strip().startswith(f"error: {weights.parent}: cannot load checkpoint"), res.stderr[-2000:]
    assert (run_dir / "checkpoints" / "last").read_text().strip() == "epoch_0002"
    # the refused resume did not replace the run's recipe
    assert json.loads((run_dir / "recipe.json").read_text())["train"]["max_epoch"] == 2


def test_resume_with_another_batch_size_keeps_the_schedule_in_epochs(tmp_path: Path) -> None:
    # 24 images: batch 8 -> 3 steps/epoch, then batch 4 -> 6 steps/epoch. A decay every 2 epochs must fire
    # after epoch 2 of the resumed run, i.e. at step 2 * 6 = 12 in the new units (not at 2 * 3 = 6).
    common = {"eval.compute_map": "false", "scheduler.name": "'step'", "scheduler.step_size": 2,
              "scheduler.gamma": 0.1, "scheduler.warmup_iters": 0, "optimizer.lr": 0.01}
    run_dir = tmp_path / "runs" / "demo" / "round1"
    _run(["-m", "accel_det.train", str(DEMO), *_overrides(tmp_path, **common, **{"train.max_epoch": 1})],
         cwd=tmp_path)
    res = _run(["-m", "accel_det.train", str(DEMO),
                *_overrides(tmp_path, **common, **{"train.max_epoch": 3, "data.batch_size": 4})], cwd=tmp_path)
    assert "note: batch_size 8 -> 4, steps_per_epoch 3 -> 6: continuing the schedule at epoch 1" in res.stdout
    train = [r for r in _events(run_dir, "train") if r["epoch"] > 1]
    # `step` counts optimizer steps taken: monotonic across the resume (3 in epoch 1, then 6 per epoch)
    assert [r["step"] for r in train][:1] == [4] and train[-1]["step"] == 15
    # the schedule is at 2 * 6 = 12 of its steps after epoch 2, i.e. after step 3 + 6 = 9 taken
    lr = {r["step"]: r["lr"] for r in train}
    assert lr[8] == pytest.approx(0.01) and lr[9] == pytest.approx(0.001)


def test_second_run_on_same_run_dir_is_refused(tmp_path: Path) -> None:
    import fcntl

    run_dir = tmp_path / "runs" / "demo" / "round1"
    run_dir.mkdir(parents=True)
    with (run_dir / ".lock").open("a+") as held:
        fcntl.lockf(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("host test pid 1\n")
        held.flush()
        res = subprocess.run([sys.executable, "-m", "accel_det.train", str(DEMO), *_overrides(tmp_path)],
                             capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 1
    assert "another run is using this run dir (host test pid 1)" in res.stderr
    assert not (run_dir / "recipe.json").exists()


@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
    # multistep (not cosine) so the schedule of epochs 1-2 does not depend on max_epoch
    common = {"eval.compute_map": "false", "data.augments": "['hflip']", "scheduler.name": "'multistep'"}
    _run(["-m", "accel_det.train", str(DEMO), *_overrides(a, **common, **{"train.max_epoch": 2})], cwd=a)
    _run(["-m", "accel_det.train", str(DEMO), *_overrides(b, **common, **{"train.max_epoch": 1})], cwd=b)
    _run(["-m", "accel_det.train", str(DEMO), *_overrides(b, **common, **{"train.max_epoch": 2})], cwd=b)
    wa = load_file(str(a / "runs/demo/round1/model.safetensors"))
    wb = load_file(str(b / "runs/demo/round1/model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=k)


def test_bad_recipe_fails_cleanly(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "accel_det.train", str(DEMO), "optimizer.lr=-1"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip() == f"error: {DEMO}: optimizer.lr: Input should be greater than 0"
