"""The command line as a user meets it, in subprocesses: `accel-det train`, `python -m accel_det.evaluate` and
`python -m accel_det.predict` on a finished run; re-running a finished run; refusals of another model or class
order; and every expected failure as exactly one line on stderr, with the right exit code and no traceback.

Tiny: FaceBoxes at 128 px on 24 synthetic 64 px images (tests/tiny_run.py), 2 DataLoader workers for the
shared run so that the workers' path is exercised end to end.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from procs import run, torchrun
from tiny_run import tiny_overrides

REPO = Path(__file__).parents[1]
DEMO = REPO / "recipes" / "demo.toml"
SCRIPTS = Path(__file__).parent / "dist_scripts"

pytestmark = pytest.mark.slow


def _accel_det() -> list[str]:
    exe = shutil.which("accel-det")
    assert exe, "the console script accel-det is not installed (pip install -e .)"
    return [exe]


def _error_line(res: subprocess.CompletedProcess[str]) -> str:
    """The one line an expected failure prints (stderr), after checking it is the only one."""
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-3000:]
    assert "Traceback" not in res.stderr + res.stdout
    return lines[0]


def _train(tmp: Path, *extra: str, rc: int | None = 0, **over: object) -> subprocess.CompletedProcess[str]:
    ov = tiny_overrides(tmp / "runs", tmp / "data", **over)
    return run([*_accel_det(), "train", DEMO, *ov, *extra], tmp, rc=rc)


def _cli(argv: list[object], capfd: pytest.CaptureFixture[str], rc: int = 0) -> subprocess.CompletedProcess[str]:
    """``accel-det ARGV`` in this process (no interpreter and torch start-up): for the cases whose point is
    the outcome, not the entry point. Paths in ARGV must be absolute."""
    from accelerate.state import AcceleratorState, GradientState

    from accel_det.cli import main

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    capfd.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        code = int(exc.code or 0)
    out, err = capfd.readouterr()
    assert code == rc, f"{argv}\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"
    return subprocess.CompletedProcess(argv, code, out, err)


def _train_in(tmp: Path, capfd: pytest.CaptureFixture[str], *extra: str, rc: int = 0,
              **over: object) -> subprocess.CompletedProcess[str]:
    return _cli(["train", DEMO, *tiny_overrides(tmp / "runs", tmp / "data", **over), *extra], capfd, rc=rc)


def _snapshot(run_dir: Path, but: tuple[str, ...] = ()) -> dict[str, str]:
    return {p.relative_to(run_dir).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file() and ".lock" not in p.name and p.name not in but}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("cli")
    over = {"train.max_epoch": 2, "data.num_workers": 2}
    res = _train(tmp, **over)
    return {"tmp": tmp, "run_dir": tmp / "runs" / "demo" / "round1", "over": over, "stdout": res.stdout}


def test_train_console_script_logs_data_epochs_and_eta(trained: dict) -> None:
    out = trained["stdout"]
    assert "data: train 24 images / " in out and "val 9 images / " in out
    assert "epoch 1/2 done in " in out and "epoch 2/2 done in " in out and " ETA " in out
    log = (trained["run_dir"] / "log.txt").read_text()
    assert "epoch 2/2 done in " in log and "done: " in log
    epochs = [json.loads(x) for x in (trained["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    epochs = [e for e in epochs if e["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2] and all("loss" in e for e in epochs)
    for e in epochs:  # img/s counts the 24 images trained on (3 batches of 8); `seconds` times a little more
        assert 24 * 0.99 <= e["img_per_s"] * e["seconds"] < 24 * 1.6


def test_evaluate_module_names_results_after_what_was_evaluated(trained: dict, capfd: pytest.CaptureFixture[str]
                                                                ) -> None:
    tmp, run_dir = trained["tmp"], trained["run_dir"]
    ev = [sys.executable, "-m", "accel_det.evaluate", run_dir]
    run([*ev, "--checkpoint", "last"], tmp)
    last = json.loads((run_dir / "eval" / "evaluate_last.json").read_text())
    assert last["num_images"] == 9 and last["checkpoint"] == "last"
    # a file called `best` in the working dir is not the keyword's checkpoint
    (tmp / "best").write_text("not weights")
    run([*ev], tmp)
    # the demo keeps an EMA: the best checkpoint's ema.safetensors
    best = json.loads((run_dir / "eval" / "evaluate_best.json").read_text())["weights"]
    assert Path(best).parent.parent == run_dir / "checkpoints" and Path(best).name == "ema.safetensors"
    # two epochs' weights files and an evaluation with overrides each get their own result file
    for epoch in (1, 2):
        _cli(["evaluate", run_dir, "--checkpoint", run_dir / "checkpoints" / f"epoch_000{epoch}" / "model.safetensors"],
             capfd)
        assert (run_dir / "eval" / f"evaluate_epoch_000{epoch}.json").is_file()
    _cli(["evaluate", run_dir, "--checkpoint", "last", "eval.max_det=5"], capfd)
    # only the val split is read: evaluating works without the training files
    _cli(["evaluate", run_dir, "--checkpoint", "last", "data.train='gone.txt'"], capfd)
    overridden = [p for p in (run_dir / "eval").glob("evaluate_last_*.json")]
    assert len(overridden) == 2
    assert ["eval.max_det=5"] in [json.loads(p.read_text())["overrides"] for p in overridden]
    assert json.loads((run_dir / "eval" / "evaluate_last.json").read_text()) == last  # not overwritten
    line = _error_line(_cli(["evaluate", run_dir, "--checkpoint", "nope"], capfd, rc=2))
    assert "--checkpoint nope: no such file or checkpoint" in line


def test_predict_module_inputs_outputs_and_bad_images(trained: dict, capfd: pytest.CaptureFixture[str]) -> None:
    tmp, run_dir = trained["tmp"], trained["run_dir"]
    src = sorted(next((tmp / "data").glob("*/JPEGImages")).glob("*.png"))
    images = tmp / "images"
    for sub in ("a", "b", "c.jpg"):  # c.jpg is a folder: not an image
        (images / sub).mkdir(parents=True)
    shutil.copy(src[0], images / "a" / "x.png")
    shutil.copy(src[1], images / "b" / "x.png")
    shutil.copy(src[2], images / "b" / "x_1.png")
    Image.open(src[0]).save(images / "a" / "x.jpg")  # a/x.jpg and a/x.png: one stem, two files
    Image.open(src[3]).resize((96, 48)).save(images / "wide.png")
    shutil.copy(src[4], images / "._x.png")  # macOS AppleDouble: hidden, skipped
    out = images / "preds"  # inside the input folder: never read back
    args = [run_dir, images, "--out", out, "--conf", "0"]
    run([sys.executable, "-m", "accel_det.predict", *args], tmp)
    res = json.loads((out / "predictions.json").read_text())
    drawn = sorted(r["drawn"] for r in res)
    assert len(res) == 5 and len(set(drawn)) == 5 and "b/x.png" in drawn and "wide.png" in drawn
    for r in res:
        with Image.open(out / r["drawn"]) as im, Image.open(r["file"]) as orig:
            assert im.size == orig.size == (r["width"], r["height"])
    _cli(["predict", *args], capfd)  # again: the first run's drawings under --out are not inputs
    assert len(json.loads((out / "predictions.json").read_text())) == 5

    (images / "bad.png").write_bytes(b"not an image")
    line = _error_line(_cli(["predict", *args], capfd, rc=1))
    assert "1 of 6 images could not be read" in line and "bad.png" in line
    res = json.loads((out / "predictions.json").read_text())
    assert len(res) == 6 and sum("error" in r for r in res) == 1  # the other five still predicted

    line = _error_line(_cli(["predict", run_dir, images / "missing.png", "--out", tmp / "p2"], capfd, rc=1))
    assert "missing.png: no such image or folder" in line and not (tmp / "p2").exists()
    line = _error_line(_cli(["predict", run_dir, images, "--out", images / "wide.png"], capfd, rc=2))
    assert "exists and is not a folder" in line
    for conf in ("1.5", "nan"):
        line = _error_line(_cli(["predict", run_dir, images, "--out", out, "--conf", conf], capfd, rc=2))
        assert f"--conf {float(conf)}: must be in [0, 1]" in line


def test_rerunning_a_finished_run_leaves_it_untouched(trained: dict, capfd: pytest.CaptureFixture[str]) -> None:
    tmp, run_dir = trained["tmp"], trained["run_dir"]
    before = _snapshot(run_dir)
    res = _train(tmp, "model.img_dim=256", **trained["over"])
    assert "finished (last checkpoint epoch_0002, train.max_epoch = 2); nothing to train" in res.stdout
    res = _train_in(tmp, capfd, **{**trained["over"], "train.max_epoch": 1})
    assert "warning: train.max_epoch = 1 is lower than the epoch of the run's last checkpoint (2)" in res.stdout
    assert _snapshot(run_dir) == before


def test_another_model_or_class_order_is_refused(trained: dict, capfd: pytest.CaptureFixture[str]) -> None:
    tmp, run_dir = trained["tmp"], trained["run_dir"]
    before = _snapshot(run_dir, but=("log.txt",))  # a refusal is appended to log.txt; nothing else changes
    swapped = "data.class_names=['square', 'circle', 'triangle']"
    line = _error_line(_train_in(tmp, capfd, swapped, rc=1, **{**trained["over"], "train.max_epoch": 3}))
    assert ("checkpoint holds classes ['circle', 'square', 'triangle'], the recipe asks for "
            "['square', 'circle', 'triangle'] (the same classes in another order") in line
    line = _error_line(_train_in(tmp, capfd, "model.name='ssdlite_mobilenet_v3'", rc=1,
                                 **{**trained["over"], "train.max_epoch": 3}))
    assert "checkpoint holds model 'faceboxes', the recipe asks for 'ssdlite_mobilenet_v3'" in line
    line = _error_line(_cli(["evaluate", run_dir, swapped], capfd, rc=1))
    assert "checkpoint holds classes" in line
    line = _error_line(_cli(["evaluate", run_dir, "model.name='ssdlite_mobilenet_v3'"], capfd, rc=1))
    assert "the run holds model 'faceboxes', the override asks for 'ssdlite_mobilenet_v3'" in line
    assert _snapshot(run_dir, but=("log.txt",)) == before
    assert "could not start: error: " in (run_dir / "log.txt").read_text()
    # predict with the weights of a run that learnt the classes in another order
    _train_in(tmp, capfd, swapped, "mission.round=2")
    other = tmp / "runs" / "demo" / "round2" / "checkpoints" / "epoch_0001"
    image = next(next((tmp / "data").glob("*/JPEGImages")).glob("*.png"))
    line = _error_line(_cli(["predict", run_dir, image, "--out", tmp / "p3", "--checkpoint", other], capfd, rc=1))
    assert f"{other}: checkpoint holds classes ['square', 'circle', 'triangle']" in line


def test_output_resume_never_and_explicit_path(trained: dict, capfd: pytest.CaptureFixture[str]) -> None:
    tmp, run_dir = trained["tmp"], trained["run_dir"]
    more = {**trained["over"], "train.max_epoch": 3}
    line = _error_line(_train_in(tmp, capfd, "output.resume='never'", rc=1, **more))
    assert "already holds checkpoints and output.resume = 'never'" in line
    first = run_dir / "checkpoints" / "epoch_0001"
    res = _train_in(tmp, capfd, f"output.resume='{first}'", **more)
    assert f"resumed from {first} (epoch 1, step 3)" in res.stdout
    epochs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs if e["event"] == "epoch"][-2:] == [2, 3]


# ---------------------------------------------------------------------------------------------------------
# one line per expected failure


def _voc(root: Path, n_train: int, n_val: int, objects_in: tuple[str, ...] = ("train", "val")) -> Path:
    """A tiny VOC folder of noise images, one 'circle' box each in the splits named by objects_in."""
    rng = np.random.default_rng(0)
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    splits = {"train": [f"{i:04d}" for i in range(n_train)], "val": [f"v{i:03d}" for i in range(n_val)]}
    for split, ids in splits.items():
        for image_id in ids:
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "JPEGImages" /
                                                                                    f"{image_id}.png")
            obj = ("<object><name>circle</name><difficult>0</difficult><bndbox><xmin>10</xmin><ymin>12</ymin>"
                   "<xmax>40</xmax><ymax>44</ymax></bndbox></object>") if split in objects_in else ""
            (root / "Annotations" / f"{image_id}.xml").write_text(
                f"<annotation><filename>{image_id}.png</filename><size><width>64</width><height>64</height>"
                f"<depth>3</depth></size>{obj}</annotation>")
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{x}\n" for x in ids))
    return root


def _voc_overrides(root: Path) -> list[str]:
    return ["data.format='voc'", f"data.root='{root}'", "data.class_names=['circle']"]


def test_run_time_errors_are_one_line(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    line = _error_line(_train_in(tmp_path, capfd, f"output.root='{blocker / 'runs'}'", rc=1))
    assert line.startswith(f"error: output.root: cannot write the run dir {blocker / 'runs'}")

    line = _error_line(_train_in(tmp_path, capfd, "data.root='/proc/accel_det/data'", rc=1))
    assert line.startswith("error: data.root: cannot create /proc/accel_det/data")

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(os.urandom(300))
    line = _error_line(_train_in(tmp_path, capfd, f"model.weights='{garbage}'", rc=1))
    assert str(garbage) in line

    if shutil.which("wandb") is None:
        line = _error_line(_train_in(tmp_path, capfd, "log.trackers=['wandb']", rc=2))
        assert "log.trackers: 'wandb' needs the package wandb (pip install wandb)" in line

    no_objects = _voc(tmp_path / "voc_empty", 4, 2, objects_in=("val",))
    line = _error_line(_train_in(tmp_path, capfd, *_voc_overrides(no_objects), rc=1, **{"data.batch_size": 2}))
    assert f"{no_objects / 'ImageSets/Main/train.txt'}: the training split has no objects" in line
    assert not (tmp_path / "runs" / "demo" / "round1" / "checkpoints").exists()


def test_recipe_errors_are_one_line_exit_2(tmp_path: Path) -> None:
    recipe = tmp_path / "dup.toml"
    recipe.write_text('[optimizer]\nlr = 0.1\nlr = 0.2\n')
    line = _error_line(run([*_accel_det(), "train", recipe], tmp_path, rc=2))
    assert line == f"error: {recipe}: not valid TOML: duplicate key 'lr' in [optimizer] (line 3)"
    line = _error_line(_train(tmp_path, rc=2, **{"train.max_epoch": "true"}))
    assert "train.max_epoch: Input should be a valid integer" in line
    line = _error_line(_train(tmp_path, "mission.name=2024-05-01", rc=2))
    assert "mission.name" in line and "quote the value" in line


def test_unreadable_sample_in_a_worker_skipped_or_one_line(tmp_path: Path) -> None:
    root = _voc(tmp_path / "voc", 8, 2)
    bad = root / "JPEGImages" / "0003.png"
    bad.write_bytes(b"truncated")
    over = {"data.num_workers": 2, "data.batch_size": 2}
    # the default, data.on_bad_sample = 'skip': another sample stands in, the epoch says so
    res = _train(tmp_path, *_voc_overrides(root), **over)
    assert "1 sample(s) could not be read and were replaced" in res.stdout and str(bad) in res.stdout
    events = [json.loads(x) for x in (tmp_path / "runs/demo/round1/metrics.jsonl").read_text().splitlines()]
    assert [e["count"] for e in events if e["event"] == "bad_samples"] == [1]
    # 'error': the sample's one line, from inside a DataLoader worker, and the run dir says where it stopped
    line = _error_line(_train(tmp_path, *_voc_overrides(root), "data.on_bad_sample='error'", "mission.round=2",
                              rc=1, **over))
    assert line.startswith(f"error: {bad}: cannot read image")
    assert "stopped in epoch 1/1" in (tmp_path / "runs" / "demo" / "round2" / "log.txt").read_text()


def test_val_without_ground_truth_is_never_best(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    root = _voc(tmp_path / "voc", 4, 2, objects_in=("train",))
    res = _train_in(tmp_path, capfd, *_voc_overrides(root), **{"data.batch_size": 2, "train.max_epoch": 2})
    assert "the val split has no objects" in res.stdout
    assert res.stdout.count("no checkpoint is marked 'best'") == 1
    ckpts = tmp_path / "runs" / "demo" / "round1" / "checkpoints"
    assert (ckpts / "last").is_file() and not (ckpts / "best").exists()


# ---------------------------------------------------------------------------------------------------------
# two processes


def _ours(stderr: str) -> str:
    """stderr without torchrun's own report of a failed child (a traceback of the launcher, not of ours)."""
    head, *tracebacks = stderr.split("Traceback (most recent call last):")
    return head + "".join(f"Traceback (most recent call last):{t}" for t in tracebacks
                          if "torch/distributed/run.py" not in t)


def test_an_error_is_printed_once_not_once_per_process(tmp_path: Path) -> None:
    ov = tiny_overrides(tmp_path / "runs", Path("/proc/accel_det/data"))
    res = run([*torchrun(2), "-m", "accel_det.train", DEMO, *ov], tmp_path, rc=None)
    assert res.returncode != 0
    assert res.stderr.count("error: data.root: cannot create") == 1, res.stderr[-3000:]
    assert "Traceback" not in _ours(res.stderr), res.stderr[-3000:]


def test_one_process_failing_stops_both_quickly(tmp_path: Path) -> None:
    ov = tiny_overrides(tmp_path / "runs", tmp_path / "data", **{"data.batch_size": 4, "train.max_epoch": 2})
    t0 = time.perf_counter()
    res = run([*torchrun(2), SCRIPTS / "raise_on_rank.py", "1", "2", DEMO, *ov], tmp_path, rc=None, timeout=120)
    assert res.returncode != 0
    assert time.perf_counter() - t0 < 90
    assert res.stderr.count("[rank 1] error: injected failure on rank 1 at step 2") == 1, res.stderr[-3000:]
    assert "Traceback" not in _ours(res.stderr), res.stderr[-3000:]
    log = (tmp_path / "runs" / "demo" / "round1" / "log.txt").read_text()
    assert "[rank 1] stopped in epoch 1/2, at optimizer step 2: error: injected failure on rank 1" in log
