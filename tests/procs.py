"""Running accel_det in subprocesses from tests: a clean environment, a timeout that kills the whole process
group (a deadlocked collective fails the test instead of hanging CI), and torchrun on a free port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

TIMEOUT = 300  # seconds per launch; a healthy tiny run takes < 15 s here


def clean_env(tmp: Path) -> dict[str, str]:
    """No launcher variables of an outer run leak in; HF_HOME: no `accelerate config` file of this machine;
    one thread per process (2 cores)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HOME=str(tmp / "hf_home"), PYTHONUNBUFFERED="1")
    return env


def run(cmd: list[object], cwd: Path, rc: int | None = 0, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in ``cwd``; with ``rc`` set, assert its exit code (showing the output when it differs)."""
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=clean_env(cwd), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{cmd} did not finish in {timeout}s\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}")
    res = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if rc is not None:
        assert res.returncode == rc, f"{cmd}\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"
    return res


def torchrun(n: int) -> list[object]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", n, "--master_addr", "127.0.0.1",
            "--master_port", port]
