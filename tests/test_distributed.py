"""Two processes on the CPU (gloo) behave like one: LR per step, gradient accumulation, eval of a padded last
batch, checkpoint + resume, the launch guard, loopback multi-node, and logging from the main process only.

Every launch is a real one (torchrun, ``accelerate launch``) in a subprocess with a timeout, in its own
process group: a deadlock (a collective that only some processes reach) fails the test instead of hanging CI.
Tiny on purpose: 64 px synthetic images, FaceBoxes at 128 px, no DataLoader workers, OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_run import tiny_overrides

from accel_det.optim import LRFactor

REPO = Path(__file__).parents[1]
DEMO = REPO / "recipes" / "demo.toml"
SCRIPTS = Path(__file__).parent / "dist_scripts"
CONFIGS = REPO / "accelerate_configs"
TIMEOUT = 300  # seconds per launch; a healthy one takes < 15 s here
GUARD_MSG = "the launcher started 2 processes but the Accelerator joined 1"

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------------------------------------------
# helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ACCELERATE_")
           and k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    # HF_HOME: no `accelerate config` default file of this machine leaks in; one thread per process (2 cores)
    env.update(OMP_NUM_THREADS="1", HF_HOME=str(tmp / "hf_home"), PYTHONUNBUFFERED="1", **extra)
    return env


def _start(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    cwd.mkdir(parents=True, exist_ok=True)
    # own session = own process group: on a timeout we kill the launcher and every worker it started
    return subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen[str], timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{proc.args} did not finish in {timeout}s (deadlock?)\nstdout:\n{out[-3000:]}\n"
                    f"stderr:\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _run(cmd: list[str], cwd: Path, env: dict[str, str], ok: bool = True,
         timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    res = _finish(_start(cmd, cwd, env), timeout)
    if ok:
        assert res.returncode == 0, f"{cmd}\nstdout:\n{res.stdout[-3000:]}\nstderr:\n{res.stderr[-3000:]}"
    return res


def _torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]


def _accelerate(*args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", *args]


TRAIN = ["-m", "accel_det.train", str(DEMO)]


def _overrides(out: Path, data: Path, **extra: object) -> list[str]:
    return tiny_overrides(out, data, **{"data.batch_size": 4, **extra})


def _events(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == kind]


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def _scores_by_image(predictions: Path) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for p in _json(predictions):
        out.setdefault(p["image_id"], []).append(p["score"])
    return {k: sorted(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------------
# 1. LR per optimizer step


def test_lr_per_step_matches_one_process(tmp_path: Path) -> None:
    # Milestones are given in epochs and become optimizer steps: with the same per-process batch an epoch of
    # N processes has N times fewer steps, so the milestone would land on another step by design. The same
    # global batch (1 x 8 vs 2 x 4) gives both runs 2 steps/epoch, and then the LR must agree at every step.
    # A scheduler passed through accelerator.prepare() would step twice per optimizer step with 2 processes.
    data = tmp_path / "data"
    common = {"data.synthetic.num_train": 16, "train.max_epoch": 3, "scheduler.name": "'multistep'",
              "scheduler.milestones": "[2]", "scheduler.gamma": 0.1, "scheduler.warmup_iters": 3,
              "scheduler.warmup_factor": 0.1, "optimizer.lr": 0.01, "eval.compute_map": "false",
              "output.checkpoint_freq": 0}
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, *TRAIN, *_overrides(one, data, **common, **{"data.batch_size": 8})], one, _env(tmp_path))
    _run([*_torchrun(2), *TRAIN, *_overrides(two, data, **common, **{"data.batch_size": 4})], two, _env(tmp_path))

    lrs = []
    for root in (one, two):
        run_dir = root / "demo" / "round1"
        records = _events(run_dir, "train")
        assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # log_freq 1: one record per batch
        lrs.append({r["step"]: r["lr"] for r in records})
    assert lrs[0] == lrs[1]
    # and both are the schedule of one process: warmup over steps 0-2, x0.1 from epoch 2 = step 4
    factor = LRFactor("multistep", total_steps=6, milestones=[4], gamma=0.1, warmup_iters=3, warmup_factor=0.1)
    assert lrs[1] == {k: pytest.approx(0.01 * factor(k), rel=1e-12) for k in range(1, 7)}
    assert lrs[1][2] < lrs[1][3] and lrs[1][4] == pytest.approx(lrs[1][3] * 0.1)  # covers warmup and milestone

    env = _json(two / "demo" / "round1" / "env.json")
    assert env["accelerate"]["num_processes"] == 2
    assert env["accelerate"]["distributed_type"] == "DistributedType.MULTI_CPU"
    assert env["effective_batch"] == 4 * 2 * 1


# ---------------------------------------------------------------------------------------------------------
# 2. gradient accumulation


def test_accumulation_equals_two_processes(tmp_path: Path) -> None:
    # 1 process x batch 4 x accumulation 2 vs 2 processes x batch 4 x accumulation 1, one optimizer step each.
    # Same 8 images in the same two groups of 4: the seedable sampler gives one order for any process count,
    # accelerate hands batch i to process i, and the single process takes batches 0 and 1 in turn.
    # Same loss scale: MultiBox divides by the matched priors of its (micro-)batch, so neither run equals one
    # 8-image batch, but both average the same two per-batch losses' gradients: accelerator.backward divides
    # by the accumulation steps (sum of loss/2), DDP averages over the 2 processes ((g0 + g1) / 2).
    # No augments (a random flip would draw differently per process); BN in eval mode (see the script).
    data = tmp_path / "data"
    ov = _overrides(tmp_path / "runs", data, **{"data.synthetic.num_train": 16, "data.synthetic.num_val": 4,
                                                "data.augments": "[]", "optimizer.name": "'sgd'",
                                                "optimizer.lr": 0.05})
    script = SCRIPTS / "accum_step.py"
    out1, out2 = tmp_path / "one.pt", tmp_path / "two.pt"
    _run([*_torchrun(1), script, out1, DEMO, *ov, "train.accumulation_freq=2"], tmp_path, _env(tmp_path))
    _run([*_torchrun(2), script, out2, DEMO, *ov, "train.accumulation_freq=1"], tmp_path, _env(tmp_path))
    one, two = torch.load(out1), torch.load(out2)
    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    assert one["micro_batches"] == two["micro_batches"]
    assert [len(b) for b in one["micro_batches"]] == [4, 4] and len({i for b in one["micro_batches"] for i in b}) == 8

    moved = 0.0
    for k, before in one["before"].items():
        if not before.is_floating_point():
            continue
        torch.testing.assert_close(two["before"][k], before, rtol=0, atol=0, msg=k)  # same init
        torch.testing.assert_close(two["after"][k], one["after"][k], rtol=1e-5, atol=1e-7, msg=k)
        moved = max(moved, float((one["after"][k] - before).abs().max()))
    assert moved > 1e-4  # the step did change the weights


# ---------------------------------------------------------------------------------------------------------
# 3. + 6. a 2-process run: train, eval of an odd val set, checkpoint; evaluate; resume; logging


@pytest.fixture(scope="module")
def two_proc_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """2 processes via accelerate_configs/cpu_2proc.yaml, accumulation 2, 9 val images in batches of 4."""
    tmp = tmp_path_factory.mktemp("two_proc")
    ov = _overrides(tmp / "runs", tmp / "data", **{"train.accumulation_freq": 2})
    cmd = _accelerate("--config_file", str(CONFIGS / "cpu_2proc.yaml"), "--main_process_port", str(_free_port()),
                      *TRAIN, *ov)
    res = _run(cmd, tmp, _env(tmp))
    run_dir = tmp / "runs" / "demo" / "round1"
    return {"tmp": tmp, "run_dir": run_dir, "overrides": ov, "stdout": res.stdout,
            "log_txt": (run_dir / "log.txt").read_text()}


def test_two_process_eval_checkpoint_resume(two_proc_run: dict) -> None:
    tmp, run_dir, ov = two_proc_run["tmp"], two_proc_run["run_dir"], two_proc_run["overrides"]
    env = _json(run_dir / "env.json")
    assert env["accelerate"]["num_processes"] == 2 and env["effective_batch"] == 4 * 2 * 2

    # eval: 9 images over 2 processes x batch 4 pads the last batch; the padding must not be scored
    (ev,) = _events(run_dir, "eval")
    assert ev["num_images"] == 9
    preds = _json(run_dir / "eval" / "predictions_epoch_0001.json")
    per_image = Counter(p["image_id"] for p in preds)
    assert len(per_image) == 9 and max(per_image.values()) <= 100  # eval.max_det: no image counted twice
    state = _json(run_dir / "checkpoints" / "epoch_0001" / "trainer_state.json")
    # 3 batches per process, accumulation 2 -> steps after batch 2 and at the end of the epoch
    assert (state["epoch"], state["global_step"], state["num_processes"]) == (1, 2, 2)

    # the same weights scored by `accel-det evaluate` in 1 process, then in 2: the AP of the in-training eval.
    # Per image too: a process scoring its shard with other weights or BN statistics shows up here.
    in_training = _scores_by_image(run_dir / "eval" / "predictions_epoch_0001.json")
    one = [sys.executable, "-m", "accel_det.cli", "evaluate", str(run_dir), "--checkpoint", "last"]
    two = _accelerate("--config_file", str(CONFIGS / "cpu_2proc.yaml"), "--main_process_port", str(_free_port()),
                      "-m", "accel_det.evaluate", str(run_dir), "--checkpoint", "last")
    for launcher, cmd in (("1 process", one), ("accelerate launch, 2 processes", two)):
        _run(cmd, tmp, _env(tmp))
        scores = _scores_by_image(run_dir / "eval" / "predictions_evaluate_last.json")
        assert scores.keys() == in_training.keys()
        for image_id, s in scores.items():
            assert s == pytest.approx(in_training[image_id], abs=1e-5), (launcher, image_id)
        result = _json(run_dir / "eval" / "evaluate_last.json")
        assert result["num_images"] == 9
        assert result["num_detections"] == ev["num_detections"]
        assert result["AP"] == pytest.approx(ev["AP"], abs=1e-6), launcher
        assert result["AP50"] == pytest.approx(ev["AP50"], abs=1e-6), launcher

    # resume in 2 processes with one more epoch: continues the step count from the checkpoint
    res = _run([*_torchrun(2), *TRAIN, *ov, "train.max_epoch=2"], tmp, _env(tmp))
    assert "resumed from" in res.stdout and "(epoch 1, step 2)" in res.stdout
    assert [(r["epoch"], r["step"]) for r in _events(run_dir, "epoch")] == [(1, 2), (2, 4)]
    assert [r["num_images"] for r in _events(run_dir, "eval")] == [9, 9]
    assert (run_dir / "checkpoints" / "last").read_text().strip() == "epoch_0002"
    state = _json(run_dir / "checkpoints" / "epoch_0002" / "trainer_state.json")
    assert (state["epoch"], state["global_step"], state["num_processes"]) == (2, 4, 2)
    assert (run_dir / "model.safetensors").is_file()


def test_two_process_logging_not_duplicated(two_proc_run: dict) -> None:
    # only the main process prints and writes: a second writer would repeat every line
    stdout = two_proc_run["stdout"]
    assert "2 process(es)" in stdout
    text_lines = [ln.strip() for ln in stdout.splitlines() if re.search(r"\w", ln)]  # table borders aside
    dup = [ln for ln, n in Counter(text_lines).items() if n > 1]
    assert not dup, f"duplicated stdout lines: {dup}"
    # accumulation 2: the first log line is at the first optimizer step, batch 2
    for msg in ("run dir ", "epoch 1/1 batch 2/3 ", "coco @ epoch 1", "done: "):
        assert sum(ln.startswith(msg) for ln in text_lines) == 1, msg

    log_lines = [re.sub(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", "", ln).strip()
                 for ln in two_proc_run["log_txt"].splitlines() if re.search(r"\w", ln)]
    dup = [ln for ln, n in Counter(log_lines).items() if n > 1]
    assert not dup, f"duplicated log.txt lines: {dup}"
    assert sum(ln.startswith("run dir ") for ln in log_lines) == 1
    # what log.txt says is what stdout said (no process wrote to one and not the other)
    plain = [ln for ln in log_lines if ln.startswith(("run dir ", "epoch ", "checkpoint: ", "done: "))]
    assert plain and all(ln in text_lines for ln in plain)


# ---------------------------------------------------------------------------------------------------------
# 4. the launch guard and the launcher traps


@pytest.mark.parametrize("mode", ["early_state", "no_cpu_flag"])
def test_guard_stops_unjoined_processes(tmp_path: Path, mode: str) -> None:
    # `accelerate launch --multi_gpu --num_processes 2` on this CPU machine, with an Accelerator that does not
    # join the process group (see the script): both processes must refuse, quickly, before writing anything,
    # and the error is printed once (by rank 0), not once per process.
    cmd = _accelerate("--multi_gpu", "--num_processes", "2", "--main_process_port", str(_free_port()),
                      str(SCRIPTS / "train_unjoined.py"), mode, str(DEMO), *_overrides(tmp_path / "runs", tmp_path))
    t0 = time.perf_counter()
    res = _run(cmd, tmp_path, _env(tmp_path), ok=False, timeout=120)
    assert res.returncode != 0
    assert res.stderr.count(f"error: {GUARD_MSG}") == 1, res.stderr[-3000:]
    assert time.perf_counter() - t0 < 60
    assert not (tmp_path / "runs").exists()


def test_world_size_without_launcher_fails_fast(tmp_path: Path) -> None:
    # WORLD_SIZE=2 left in the environment of a plain single process: with accelerate 1.15 the Accelerator
    # tries to join a 2-process gloo group and stops at once for lack of MASTER_ADDR (with MASTER_ADDR set
    # it would wait for the missing rank instead: the timeout below catches that).
    cmd = [sys.executable, *TRAIN, *_overrides(tmp_path / "runs", tmp_path)]
    res = _run(cmd, tmp_path, _env(tmp_path, WORLD_SIZE="2"), ok=False, timeout=120)
    assert res.returncode != 0
    assert not (tmp_path / "runs" / "demo" / "round1" / "checkpoints").exists()


def test_cpu_flag_launch_starts_one_process(tmp_path: Path) -> None:
    # The trap pinned: `accelerate launch --cpu --num_processes 2` starts ONE process without MPI, and sets no
    # variable that says 2 was asked for, so no guard can see it. The run is an honest 1-process run and says
    # so (accelerate_configs/cpu_2proc.yaml is the working way to get 2 CPU processes).
    cmd = _accelerate("--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                      "--dynamo_backend", "no", *TRAIN,
                      *_overrides(tmp_path / "runs", tmp_path / "data", **{"eval.compute_map": "false"}))
    res = _run(cmd, tmp_path, _env(tmp_path))
    env = _json(tmp_path / "runs" / "demo" / "round1" / "env.json")
    assert env["accelerate"]["num_processes"] == 1 and env["effective_batch"] == 4
    assert "1 process(es)" in res.stdout


# ---------------------------------------------------------------------------------------------------------
# 5. loopback multi-node


def test_loopback_two_machines(tmp_path: Path) -> None:
    # 2 "machines" x 1 process on 127.0.0.1 with the shipped multi_node.yaml (its fp16 and addresses
    # overridden), each started from its own working dir; the run dir is shared (same filesystem).
    port = str(_free_port())
    ov = _overrides(tmp_path / "runs", tmp_path / "data")
    procs = []
    for rank in (0, 1):
        cmd = _accelerate("--config_file", str(CONFIGS / "multi_node.yaml"), "--num_processes", "2",
                          "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                          "--main_process_port", port, "--mixed_precision", "no", *TRAIN, *ov)
        procs.append(_start(cmd, tmp_path / f"machine{rank}", _env(tmp_path)))
    results = [_finish(p) for p in procs]
    for rank, res in enumerate(results):
        assert res.returncode == 0, f"machine {rank}\nstdout:\n{res.stdout[-3000:]}\nstderr:\n{res.stderr[-3000:]}"
    run_dir = tmp_path / "runs" / "demo" / "round1"
    env = _json(run_dir / "env.json")
    assert env["accelerate"]["num_processes"] == 2 and env["effective_batch"] == 8
    assert "2 process(es)" in results[0].stdout
    assert "run dir" not in results[1].stdout and "epoch 1/1" not in results[1].stdout  # machine 1: not main
    assert [r["num_images"] for r in _events(run_dir, "eval")] == [9]
    assert _json(run_dir / "checkpoints" / "epoch_0001" / "trainer_state.json")["num_processes"] == 2
