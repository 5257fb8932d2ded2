"""Nothing lost: a run killed at any point and resumed ends bit-identical to one never stopped (workers 0 and 2,
random augments, 1 and 2 processes); SIGTERM saves and exits 0; a crash inside a checkpoint save resumes from
the previous complete checkpoint; a failing evaluation keeps its epoch's checkpoint.

Subprocesses (the kill is real), tiny: FaceBoxes at 128 px on 24 synthetic 64 px images, batch 8 (3 steps per
epoch), 2 epochs, a mid-epoch checkpoint every 2 optimizer steps.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from procs import clean_env, run, torchrun
from safetensors.torch import load_file
from tiny_run import tiny_overrides

REPO = Path(__file__).parents[1]
DEMO = REPO / "recipes" / "demo.toml"
INTERRUPT = Path(__file__).parent / "dist_scripts" / "interrupt.py"

pytestmark = pytest.mark.slow


def _run(cmd: list[object], cwd: Path) -> subprocess.CompletedProcess[str]:
    return run(cmd, cwd, rc=None)


def _ok(res: subprocess.CompletedProcess[str], rc: int = 0) -> subprocess.CompletedProcess[str]:
    assert res.returncode == rc, f"{res.args}\nstdout:\n{res.stdout[-3000:]}\nstderr:\n{res.stderr[-3000:]}"
    return res


def _overrides(tmp: Path, data: Path, **extra: object) -> list[str]:
    return tiny_overrides(tmp / "runs", data, **{
        "train.max_epoch": 2, "eval.compute_map": "false", "output.checkpoint_every_steps": 2,
        "data.augments": "['photometric', 'zoom_out', 'iou_crop', 'hflip']", **extra})


def _weights(tmp: Path) -> dict[str, torch.Tensor]:
    return load_file(str(tmp / "runs" / "demo" / "round1" / "model.safetensors"))


def _train_events(tmp: Path) -> list[dict]:
    lines = (tmp / "runs" / "demo" / "round1" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] in ("train", "resume")]


def _after_resume(events: list[dict]) -> list[tuple]:
    """(epoch, batch, step, losses) of the train events after the last resume marker."""
    last = max((i for i, e in enumerate(events) if e["event"] == "resume"), default=-1)
    return [(e["epoch"], e["batch"], e["step"], e["loss"], e["loss_loc"], e["loss_cls"])
            for e in events[last + 1:] if e["event"] == "train"]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize(("workers", "ema"), [(0, False), (2, True)])
def test_killed_mid_epoch_then_resumed_equals_never_stopped(tmp_path: Path, workers: int, ema: bool) -> None:
    data = tmp_path / "data"
    # with EMA, model.safetensors is the average: its state (and update count) must survive the kill too
    extra = {"data.num_workers": workers, "train.ema": f"{{enabled = {str(ema).lower()}, decay = 0.9, warmup = 2}}"}
    ov = _overrides(tmp_path / "a", data, **extra)
    _ok(_run([sys.executable, "-m", "accel_det.train", DEMO, *ov], tmp_path / "a"))
    ov = _overrides(tmp_path / "b", data, **extra)
    # killed after step 5: the newest checkpoint is step 4's, one batch into epoch 2
    res = _run([sys.executable, INTERRUPT, "kill", 5, DEMO, *ov], tmp_path / "b")
    assert res.returncode == -signal.SIGKILL
    res = _ok(_run([sys.executable, "-m", "accel_det.train", DEMO, *ov], tmp_path / "b"))
    assert "(epoch 1 + 1 batches, step 4)" in res.stdout
    _same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    # the history after the resume point is the history of the run that never stopped
    resumed = _after_resume(_train_events(tmp_path / "b"))
    assert resumed and resumed[0][:3] == (2, 2, 5)
    assert resumed == [e for e in _after_resume(_train_events(tmp_path / "a")) if e[2] >= 5]


def test_two_processes_killed_then_resumed_equal_never_stopped(tmp_path: Path) -> None:
    data = tmp_path / "data"
    # 2 x 4: still 3 steps per epoch; EMA on: one average per process, restored on each
    extra = {"data.batch_size": 4, "train.ema": "{enabled = true, decay = 0.9, warmup = 2}"}
    _ok(_run([*torchrun(2), "-m", "accel_det.train", DEMO, *_overrides(tmp_path / "a", data, **extra)],
             tmp_path / "a"))
    ov = _overrides(tmp_path / "b", data, **extra)
    res = _run([*torchrun(2), INTERRUPT, "kill", 5, DEMO, *ov], tmp_path / "b")
    assert res.returncode != 0
    res = _ok(_run([*torchrun(2), "-m", "accel_det.train", DEMO, *ov], tmp_path / "b"))
    assert "(epoch 1 + 1 batches, step 4)" in res.stdout
    _same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))


@pytest.mark.parametrize(("mode", "name", "rc"), [("term", "SIGTERM", 0), ("int", "SIGINT", 130)])
def test_a_signal_saves_exits_and_resumes_at_the_next_batch(tmp_path: Path, mode: str, name: str, rc: int) -> None:
    ov = _overrides(tmp_path, tmp_path / "data", **{"output.checkpoint_every_steps": 0})
    res = _ok(_run([sys.executable, INTERRUPT, mode, 4, DEMO, *ov], tmp_path), rc=rc)
    ckpt = tmp_path / "runs" / "demo" / "round1" / "checkpoints" / "epoch_0001_step_00000004"
    assert res.stderr.strip() == f"stopped: {name}: saved checkpoint {ckpt}; the same command resumes from it"
    # what a SLURM script checks before requeueing (README): the last line of log.txt
    assert f"stopped: {name}" in (ckpt.parents[1] / "log.txt").read_text().splitlines()[-1]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert (state["epoch"], state["batch_in_epoch"], state["global_step"]) == (1, 1, 4)
    res = _ok(_run([sys.executable, "-m", "accel_det.train", DEMO, *ov], tmp_path))
    assert _after_resume(_train_events(tmp_path))[0][:3] == (2, 2, 5)


def test_crash_inside_a_save_resumes_from_the_previous_checkpoint(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _ok(_run([sys.executable, "-m", "accel_det.train", DEMO, *_overrides(tmp_path / "a", data)], tmp_path / "a"))
    ov = _overrides(tmp_path / "b", data)
    # armed at step 3: the next save (epoch 1's end, step 3) dies before its trainer_state.json
    res = _run([sys.executable, INTERRUPT, "crash_in_save", 3, DEMO, *ov], tmp_path / "b")
    assert res.returncode == -signal.SIGKILL
    root = tmp_path / "b" / "runs" / "demo" / "round1" / "checkpoints"
    assert (root / "last").read_text().strip() == "epoch_0000_step_00000002"
    res = _ok(_run([sys.executable, "-m", "accel_det.train", DEMO, *ov], tmp_path / "b"))
    assert "(epoch 0 + 2 batches, step 2)" in res.stdout
    assert not list(root.glob(".*.tmp"))  # the half-written save was cleared
    _same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))


def test_failing_evaluation_keeps_its_epochs_checkpoint(tmp_path: Path) -> None:
    ov = _overrides(tmp_path, tmp_path / "data", **{"eval.compute_map": "true", "eval.freq": 1})
    res = _run([sys.executable, INTERRUPT, "eval_raises", 1, DEMO, *ov], tmp_path)
    assert res.returncode == 1 and "error: evaluation failed: injected" in res.stderr
    root = tmp_path / "runs" / "demo" / "round1" / "checkpoints"
    assert (root / "last").read_text().strip() == "epoch_0001"
    assert json.loads((root / "epoch_0001" / "trainer_state.json").read_text())["epoch"] == 1
    assert "stopped after epoch 1/2 (evaluation, checkpoint)" in (root.parent / "log.txt").read_text()


def test_killed_before_the_first_checkpoint_restarts_and_says_so(tmp_path: Path) -> None:
    ov = _overrides(tmp_path, tmp_path / "data", **{"output.checkpoint_every_steps": 0, "train.max_epoch": 1})
    res = _run([sys.executable, INTERRUPT, "kill", 2, DEMO, *ov], tmp_path)
    assert res.returncode == -signal.SIGKILL
    res = _ok(_run([sys.executable, "-m", "accel_det.train", DEMO, *ov], tmp_path))
    assert "restart: this run dir has history but no checkpoint" in res.stdout
    events = [json.loads(x)["event"] for x in
              (tmp_path / "runs" / "demo" / "round1" / "metrics.jsonl").read_text().splitlines()]
    assert events.count("restart") == 1 and events.index("restart") > events.index("train")


def test_sigterm_while_generating_data_leaves_no_partial_folder(tmp_path: Path) -> None:
    data = tmp_path / "data"
    ov = _overrides(tmp_path, data, **{"data.synthetic.num_train": 20000, "data.synthetic.img_size": 128})
    proc = subprocess.Popen([sys.executable, "-m", "accel_det.train", DEMO, *ov], cwd=tmp_path, env=clean_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(data.glob(".*.tmp-*/JPEGImages/*.png")) and time.monotonic() < deadline:
            time.sleep(0.2)  # generation has started writing
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "stopped: terminated (SIGTERM) before training started" in err
    assert not list(data.glob(".*")), list(data.glob(".*"))


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(tmp_path: Path) -> None:
    # Only the main process gets the signal (schedulers usually signal all; this is the harder case), after
    # step 1: the flag is agreed at the next log line (step 2's), both stop after step 2, save the same
    # mid-epoch checkpoint and exit 0.
    ov = _overrides(tmp_path, tmp_path / "data", **{"data.batch_size": 4, "output.checkpoint_every_steps": 0})
    res = _ok(_run([*torchrun(2), INTERRUPT, "term", 1, DEMO, *ov], tmp_path))
    ckpt = tmp_path / "runs" / "demo" / "round1" / "checkpoints" / "epoch_0000_step_00000002"
    assert f"stopped: SIGTERM: saved checkpoint {ckpt}" in res.stderr
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert (state["global_step"], state["batch_in_epoch"], state["num_processes"]) == (2, 2, 2)
    _ok(_run([*torchrun(2), "-m", "accel_det.train", DEMO, *ov], tmp_path))
    assert _after_resume(_train_events(tmp_path))[0][:3] == (1, 3, 3)


NAN_STEPS = Path(__file__).parent / "dist_scripts" / "nan_steps.py"


def test_a_non_finite_loss_on_one_process_is_skipped_by_both(tmp_path: Path) -> None:
    record = tmp_path / "steps.json"
    ov = _overrides(tmp_path, tmp_path / "data", **{"data.batch_size": 4, "train.max_epoch": 1})
    res = _ok(_run([*torchrun(2), NAN_STEPS, 1, 2, 2, record, DEMO, *ov], tmp_path))
    steps = json.loads(record.read_text())  # the main process's view: its own loss was finite
    assert [s["skipped"] for s in steps] == [None, "non_finite", None]
    assert [s["moved"] for s in steps] == [True, False, True]  # the skipped step left the weights alone
    events = [json.loads(x) for x in (tmp_path / "runs" / "demo" / "round1" / "metrics.jsonl").read_text().splitlines()]
    (skip,) = [e for e in events if e["event"] == "skipped_step"]
    # named by the files of the process whose loss it was (rank 1's batch: 4 images), not the main process's
    assert skip["batch"] == 2 and len(skip["files"]) == 4 and all(f.endswith(".png") for f in skip["files"])
    first = [e for e in events if e["event"] == "train"][0]
    assert [e["skipped_steps"] for e in events if e["event"] == "epoch"] == [1] and first["batch"] == 1
    assert "1 step(s) skipped for non-finite values" in res.stdout


def test_non_finite_steps_in_a_row_stop_the_run(tmp_path: Path) -> None:
    ov = _overrides(tmp_path, tmp_path / "data", **{"train.max_nonfinite": 2, "train.max_epoch": 1,
                                                    "output.checkpoint_every_steps": 1})
    res = _ok(_run([sys.executable, NAN_STEPS, 0, 2, 99, tmp_path / "steps.json", DEMO, *ov], tmp_path), rc=1)
    assert res.stderr.strip().startswith("error: 2 steps in a row had non-finite values (train.max_nonfinite = 2)")
    root = tmp_path / "runs" / "demo" / "round1" / "checkpoints"
    assert (root / "last").read_text().strip() == "epoch_0000_step_00000001"  # the last good one


def test_a_killed_run_does_not_leave_its_workers_holding_the_lock(tmp_path: Path) -> None:
    ov = _overrides(tmp_path, tmp_path / "data", **{"data.num_workers": 2})
    # no pipes: waiting for output would wait for the orphaned workers too
    proc = subprocess.run([sys.executable, str(INTERRUPT), "kill", "2", str(DEMO), *ov], cwd=tmp_path,
                          env=clean_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    # relaunched at once, while the orphaned workers may still be exiting: not "another run is using it"
    res = _run([sys.executable, "-m", "accel_det.train", DEMO, *ov], tmp_path)
    assert res.returncode == 0 and "another run" not in res.stderr, res.stderr[-2000:]


def test_a_signal_inside_a_log_window_keeps_the_logged_losses(tmp_path: Path) -> None:
    # log_freq 2 and a stop after step 4 (one batch into epoch 2): the resumed run's log lines must cover
    # the same batches, with the same losses, as the run that never stopped
    data = tmp_path / "data"
    extra = {"train.log_freq": 2, "output.checkpoint_every_steps": 0}
    _ok(_run([sys.executable, "-m", "accel_det.train", DEMO, *_overrides(tmp_path / "a", data, **extra)],
             tmp_path / "a"))
    ov = _overrides(tmp_path / "b", data, **extra)
    _ok(_run([sys.executable, INTERRUPT, "term", 4, DEMO, *ov], tmp_path / "b"))
    _ok(_run([sys.executable, "-m", "accel_det.train", DEMO, *ov], tmp_path / "b"))
    lines = {}
    for run_ in ("a", "b"):
        events = [json.loads(x) for x in (tmp_path / run_ / "runs/demo/round1/metrics.jsonl").read_text().splitlines()]
        lines[run_] = {(e["event"], e["epoch"], e.get("batch")): e.get("loss") for e in events
                       if e["event"] in ("train", "epoch") and e["epoch"] == 2}
    assert lines["a"].keys() == lines["b"].keys()
    assert lines["b"] == {k: pytest.approx(v, rel=1e-6) for k, v in lines["a"].items()}
    _same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))


def test_a_signal_in_the_last_epoch_finishes_the_run(tmp_path: Path) -> None:
    ov = _overrides(tmp_path, tmp_path / "data", **{"output.checkpoint_every_steps": 0})
    res = _ok(_run([sys.executable, INTERRUPT, "term", 6, DEMO, *ov], tmp_path))  # after the last step
    assert "stopped" not in res.stderr and (tmp_path / "runs/demo/round1/model.safetensors").is_file()


def test_an_evaluation_failing_after_the_last_epoch_runs_again_on_resume(tmp_path: Path) -> None:
    ov = _overrides(tmp_path, tmp_path / "data", **{"eval.compute_map": "true", "eval.freq": 1})
    res = _run([sys.executable, INTERRUPT, "eval_raises", 4, DEMO, *ov], tmp_path)  # epoch 2's evaluation fails
    run_dir = tmp_path / "runs" / "demo" / "round1"
    assert res.returncode == 1 and not (run_dir / "model.safetensors").exists()
    res = _ok(_run([sys.executable, "-m", "accel_det.train", DEMO, *ov], tmp_path))
    assert "finished" not in res.stdout and "resumed from" in res.stdout
    assert (run_dir / "eval" / "epoch_0002.json").is_file() and (run_dir / "model.safetensors").is_file()
    res = _ok(_run([sys.executable, "-m", "accel_det.train", DEMO, *ov], tmp_path))
    assert "finished (last checkpoint epoch_0002" in res.stdout
