"""Paired before/after timing: alternate training steps of two xqtool trees, one step at a time.

On a shared machine the speed of one core drifts by 10-20 % over minutes, more than most changes
this is meant to measure. Here each tree runs in its own worker process (``bench/train_step.py``'s
step, built from that tree's code and configs), and the two workers take turns: A's step, B's step,
A's step, ... so both see the same machine conditions, pair by pair. Prints one JSON line: per-step
seconds of each side, medians, minima, the median of the per-pair ratios B/A, and this core's fp32 GEMM
speed just before and after the pairs (the machine's state at the time). Usage::

    git worktree add --detach /tmp/before <commit>
    OMP_NUM_THREADS=1 python bench/ab_train_step.py /tmp/before . --what tok-msvr10p2 --pairs 6
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

WORKER = r"""
import argparse, json, sys, tempfile, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path.cwd() / "bench"))
import train_step as ts
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
from xqtool import runtime
runtime.configure_cpu_math()
if hasattr(runtime, "configure_cpu_allocator"):
    runtime.configure_cpu_allocator()
ns = argparse.Namespace(batch=a["batch"] or ts.DEFAULT_BATCH[a["what"]], precision="fp32", compile=False,
                        device="cpu")
tmp = Path(tempfile.mkdtemp())
step, _ = (ts._tokenizer_step(ns, tmp) if a["what"].startswith("tok")
           else ts._var_step(ns, int(a["what"].split("-d")[1])))
here = Path.cwd().resolve()
foreign = [m.__file__ for n, m in list(sys.modules.items())
           if n.split(".")[0] == "xqtool" and getattr(m, "__file__", None)
           and not Path(m.__file__).resolve().is_relative_to(here)]
if foreign:  # e.g. an installed (editable) xqtool filling in modules this checkout lacks
    sys.exit(f"xqtool code imported from outside this checkout: {foreign[0]}")
for _ in range(a["warmup"]):
    step()
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() != "go":
        break
    t = time.perf_counter()
    step()
    print(time.perf_counter() - t, flush=True)
"""


def _start(tree: Path, args: argparse.Namespace, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(args.threads))
    cfg = json.dumps({"what": args.what, "threads": args.threads, "batch": args.batch, "warmup": args.warmup})
    with open(log, "w") as err:  # the worker's stderr, shown if it fails
        return subprocess.Popen([sys.executable, "-c", WORKER, cfg], cwd=tree, env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, text=True)


def _expect_ready(p: subprocess.Popen, tree: Path, log: Path) -> None:
    line = p.stdout.readline() if p.stdout else ""
    if line.strip() != "ready":
        p.wait(timeout=60)
        lines = [t for t in log.read_text(errors="replace").splitlines() if t.strip()]
        raise SystemExit(f"worker for {tree} failed to start: {lines[-1] if lines else 'no message'}")


def _one(p: subprocess.Popen) -> float:
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write("go\n")
    p.stdin.flush()
    return float(p.stdout.readline())


def _checkout(value: str) -> Path:
    """argparse type: a folder holding xqtool/ and bench/train_step.py."""
    path = Path(value).resolve()
    if not (path / "xqtool" / "__init__.py").is_file() or not (path / "bench" / "train_step.py").is_file():
        raise argparse.ArgumentTypeError(f"{value} is not an xqtool checkout (no xqtool/__init__.py and "
                                         "bench/train_step.py)")
    return path


def _at_least(low: int) -> Callable[[str], int]:
    """argparse type: an integer >= `low`."""
    def parse(value: str) -> int:
        n = int(value)
        if n < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {n}")
        return n

    return parse


DEFAULT_BATCH = {"tok-msvr10p2": 2, "var-d6": 8, "var-d17": 8}  # as bench/train_step.py


def _sgemm_gflops(threads: int) -> float:
    """This core's fp32 GEMM speed right now (2048³ ``a @ b``, best of 5): the machine's state at the time."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return round(2 * 2048 ** 3 / best / 1e9, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tree_a", type=_checkout, help="the 'before' checkout (its bench/ and xqtool/)")
    ap.add_argument("tree_b", type=_checkout, help="the 'after' checkout")
    ap.add_argument("--what", default="tok-msvr10p2", choices=("tok-msvr10p2", "var-d6", "var-d17"),
                    help="case (default tok-msvr10p2: ~14 s per step and ~6 GB per tree on a CPU; var-d6: ~2 s, 2 GB)")
    ap.add_argument("--pairs", type=_at_least(1), default=6, help="timed step pairs (default 6)")
    ap.add_argument("--warmup", type=_at_least(0), default=1, help="untimed steps per side first (default 1)")
    ap.add_argument("--threads", type=_at_least(1), default=1, help="torch intra-op threads per side (default 1)")
    ap.add_argument("--batch", type=_at_least(1), default=None, help="batch size (default: 2 tokenizer, 8 VAR)")
    args = ap.parse_args()
    trees = [args.tree_a, args.tree_b]
    logs = [Path(tempfile.mkstemp(prefix=f"ab_step_{i}_", suffix=".log")[1]) for i in range(2)]
    procs = [_start(t, args, log) for t, log in zip(trees, logs)]
    try:
        for p, t, log in zip(procs, trees, logs):  # built one after the other: warm-up steps are not timed anyway
            _expect_ready(p, t, log)
        times: List[List[float]] = [[], []]
        gemm_before = _sgemm_gflops(args.threads)
        t0 = time.time()
        for i in range(args.pairs):
            order = (0, 1) if i % 2 == 0 else (1, 0)  # ABBA: neither side always runs first
            for side in order:
                times[side].append(_one(procs[side]))
    finally:
        for p in procs:  # a closed stdin ends a worker's loop
            if p.stdin:
                p.stdin.close()
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        for log in logs:
            log.unlink(missing_ok=True)
    gemm_after = _sgemm_gflops(args.threads)
    ratios = [b / a for a, b in zip(*times)]
    out: Dict[str, Any] = {
        "case": args.what, "batch": args.batch or DEFAULT_BATCH[args.what], "pairs": args.pairs,
        "threads": args.threads, "wall_s": round(time.time() - t0, 1),
        "a": str(trees[0]), "b": str(trees[1]),
        "a_s": [round(v, 3) for v in times[0]], "b_s": [round(v, 3) for v in times[1]],
        "a_median": round(statistics.median(times[0]), 3), "b_median": round(statistics.median(times[1]), 3),
        "a_min": round(min(times[0]), 3), "b_min": round(min(times[1]), 3),
        "ratio_b_over_a_median": round(statistics.median(ratios), 4),
        "ratio_b_over_a_all": [round(r, 3) for r in ratios],
        "sgemm_gflop_s_before_after": [gemm_before, gemm_after],
        "loadavg_1m": os.getloadavg()[0],
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
