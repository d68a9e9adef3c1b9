"""Helpers of the multi-process tests: launch N gloo CPU processes with torchrun on a free port."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
# a hang fails the test instead of blocking CI (2 processes import torch + timm + accelerate: ~10-40 s)
LAUNCH_TIMEOUT = 240


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mp_env(cpu: bool = True, **extra: str) -> Dict[str, str]:
    """The test process's environment for a launch: repo on PYTHONPATH, 1 thread, no inherited rank vars."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith("ACCELERATE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["OMP_NUM_THREADS"] = "1"
    if cpu:
        env["ACCELERATE_USE_CPU"] = "true"
    env.update(extra)
    return env


def torchrun(args: Sequence[str], nproc: int = 2, env: Optional[Dict[str, str]] = None,
             log: Optional[Path] = None) -> subprocess.Popen:
    """Start ``python -m torch.distributed.run --nproc_per_node N ARGS`` in its own session."""
    cmd: List[str] = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                      "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *map(str, args)]
    out = open(log, "w") if log is not None else subprocess.DEVNULL
    return subprocess.Popen(cmd, env=env or mp_env(), stdout=out, stderr=subprocess.STDOUT, cwd=str(ROOT),
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = LAUNCH_TIMEOUT) -> int:
    """Wait for a launch; on timeout kill its whole session and fail."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"multi-process launch hung (> {timeout} s): {proc.args}") from None


def wait_for(paths: Sequence[Path], proc: subprocess.Popen, timeout: float = LAUNCH_TIMEOUT) -> None:
    """Wait until every path exists (the launch must still be running)."""
    t0 = time.monotonic()
    while not all(p.exists() for p in paths):
        if proc.poll() is not None:
            raise AssertionError(f"launch ended (rc {proc.returncode}) before {[str(p) for p in paths]} appeared")
        if time.monotonic() - t0 > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"timed out waiting for {[str(p) for p in paths]}")
        time.sleep(0.1)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the 1-process reference with the launched processes' thread count (OMP_NUM_THREADS=1): CPU
    kernels sum in a thread-count dependent order, which can flip a uint8 rounding."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
