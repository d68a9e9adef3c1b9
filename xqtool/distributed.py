"""Several processes, one run: launch checks, run description, rank-0 broadcast, agreed stop.

Every xqtool command runs unchanged under ``torchrun`` / ``accelerate launch`` (docs/scaling.md).
This module holds the few pieces that make a multi-process run behave like one run:

* :func:`process_state` — Accelerate's process state, on CPU (gloo) when ``ACCELERATE_USE_CPU`` is
  set, followed by :func:`check_launch`.
* :func:`check_launch` — a launch that asked for N processes but got one (``accelerate launch --cpu
  --num_processes N`` starts one process; ``--multi_gpu`` without a visible GPU starts N independent
  single-process runs) raises :class:`LaunchError` (one line, exit 2) before anything is written.
* :func:`describe` — "2 processes, backend gloo, device cpu, precision fp32" for run summaries.
* :func:`broadcast_modules` — copy parameters and buffers of modules that DDP does not wrap (frozen
  teachers, LPIPS, loss-side projections) from rank 0, so every rank computes the same losses.
* :func:`agree_stop` — the stop decision (a signal seen by any rank) shared by all ranks, so they
  save together instead of deadlocking in mismatched collectives.
* :func:`peer_guard` — a collective that fails because another rank died becomes one line
  (:class:`PeerLostError`) instead of a traceback.
* :func:`mean_across` — the mean of small tensors over ranks (LeCam EMA inputs, adaptive GAN weight
  gradients), which makes those statistics those of the global batch.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
from typing import Any, Dict, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from xqtool.errors import XQError

SCALING_DOC = "docs/scaling.md"


class LaunchError(XQError):
    """The launcher did not start the processes that were asked for."""


class PeerLostError(XQError):
    """Another process of a multi-process run stopped (killed, crashed) mid-run."""


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def use_cpu_requested() -> bool:
    """True when the launch asks for CPU processes (``ACCELERATE_USE_CPU=true``, set by ``--cpu``)."""
    return _flag("ACCELERATE_USE_CPU")


def check_launch(num_processes: int) -> None:
    """Raise :class:`LaunchError` when the processes started are not those the launch asked for.

    Args:
        num_processes: the world size Accelerate actually set up in this process.
    Raises:
        LaunchError: ``WORLD_SIZE`` says N > 1 but this process is alone (multi-GPU launch without a
            GPU and without ``ACCELERATE_USE_CPU``); or ``accelerate launch`` fell back to its
            single-process launcher although it was given a rendezvous (``--cpu --num_processes N``).
    """
    env_world = _env_int("WORLD_SIZE", 1)
    if env_world > 1 and num_processes != env_world:
        raise LaunchError(
            f"the launcher started {env_world} processes but they did not form one run (world size "
            f"{num_processes}): no GPU is visible and CPU processes were not asked for; set "
            f"ACCELERATE_USE_CPU=true for CPU (gloo) processes, see {SCALING_DOC}"
        )
    launched_by_accelerate = "ACCELERATE_MIXED_PRECISION" in os.environ and "ACCELERATE_DYNAMO_BACKEND" in os.environ
    if (num_processes == 1 and launched_by_accelerate and "WORLD_SIZE" not in os.environ
            and "LOCAL_RANK" not in os.environ and os.environ.get("MASTER_PORT")):
        raise LaunchError(
            "accelerate launch started a single process although several were asked for (with --cpu it "
            "ignores --num_processes); for N CPU processes run `ACCELERATE_USE_CPU=true accelerate launch "
            f"--multi_gpu --num_processes N -m xqtool ...` or `torchrun --nproc_per_node N`, see {SCALING_DOC}"
        )


def is_launch_main_process() -> bool:
    """True on the process of global rank 0, read from the launcher's environment (``RANK``), without
    initialising Accelerate's state (so the Accelerator built later still picks CPU/GPU and backend itself)."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def process_state(cpu: Optional[bool] = None) -> Any:
    """Accelerate ``PartialState`` for tasks without an Accelerator (encode), checked by :func:`check_launch`.

    Args:
        cpu: force CPU processes (gloo); default: ``ACCELERATE_USE_CPU`` from the environment.
    """
    from accelerate import PartialState

    state = PartialState(cpu=use_cpu_requested() if cpu is None else bool(cpu))
    check_launch(state.num_processes)
    return state


def make_accelerator(mixed_precision: str, **kwargs: Any) -> Any:
    """``accelerate.Accelerator(mixed_precision=..., **kwargs)`` for a trainer, refusing a precision it cannot honour.

    Raises:
        ConfigError: Accelerate rejects `mixed_precision` on this device, or it would silently drop it: with
            ``fp16`` on a CPU Accelerate trains in fp32 with no loss scaler, while the run would be reported as
            fp16 (use ``bf16`` on a CPU).
    """
    from accelerate import Accelerator

    from xqtool.errors import ConfigError

    try:
        acc = Accelerator(mixed_precision=mixed_precision, **kwargs)
    except ValueError as exc:
        raise ConfigError(f"train.mixed_precision={mixed_precision!r} is not usable here: {exc}".splitlines()[0]) from None
    if mixed_precision == "fp16" and not acc.native_amp:
        raise ConfigError(f"train.mixed_precision='fp16' needs a GPU: on {acc.device.type} Accelerate would train in "
                          "fp32 without a loss scaler; use bf16 (or no) here")
    return acc


def precision_label(mode: Any) -> str:
    """A mixed-precision mode as run reports write it: Accelerate's ``no`` → ``fp32``; others unchanged."""
    mode = str(getattr(mode, "value", mode))
    return "fp32" if mode == "no" else mode


def describe(state: Any, precision: Optional[str] = None) -> str:
    """One phrase naming world size, backend, device and precision of a run.

    Args:
        state: an ``Accelerator`` or ``PartialState``.
        precision: mixed precision mode (default: the state's own, or ``no``); Accelerate's ``no`` is
            written ``fp32``, as in the run summaries.
    """
    n = int(state.num_processes)
    backend = getattr(getattr(state, "state", state), "backend", None) or "none"
    device = getattr(state, "device", torch.device("cpu"))
    mp = precision_label(precision if precision is not None else getattr(state, "mixed_precision", None) or "no")
    return f"{n} process{'es' if n != 1 else ''}, backend {backend}, device {torch.device(device).type}, precision {mp}"


def main_process_only(command: str) -> bool:
    """For commands that do not split work (eval-fid, make-fid-stats, probe): True on the process that
    should do all of it (global rank 0, which then reads the whole data set); False on the others,
    which should return at once. Outside a multi-process launch: always True.

    The other ranks' idleness is logged in one line, so the numbers equal a 1-process run's.
    """
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return True
    rank = _env_int("RANK", 0)
    if rank != 0:
        import logging

        logging.getLogger(__name__).info("%s runs in one process: rank %d of %d has nothing to do", command, rank, world)
        return False
    # rank 0 acts as a 1-process run: its data loaders (webdataset's worker info) must not split by rank
    os.environ["RANK"], os.environ["WORLD_SIZE"] = "0", "1"
    os.environ["LOCAL_RANK"], os.environ["LOCAL_WORLD_SIZE"] = "0", "1"
    return True


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def broadcast_modules(modules: Sequence[Optional[nn.Module]], src: int = 0) -> None:
    """Overwrite parameters and buffers of `modules` with rank `src`'s (no-op in one process).

    Use for modules outside DDP whose initialisation drew from per-rank random state.
    """
    if not _initialized():
        return
    import torch.distributed as dist

    for module in modules:
        if module is None:
            continue
        for t in list(module.parameters()) + list(module.buffers()):
            if t.data.is_contiguous():
                dist.broadcast(t.data, src=src)
            else:
                tmp = t.data.contiguous()
                dist.broadcast(tmp, src=src)
                t.data.copy_(tmp)


def mean_across(*tensors: Tensor) -> Sequence[Tensor]:
    """Element-wise mean of each tensor over all ranks (the tensors unchanged in one process).

    With equal per-rank batches, the mean of per-rank batch means (or of per-rank gradients of a
    mean loss) is the global-batch value.
    """
    if not _initialized():
        return tensors
    import torch.distributed as dist

    world = dist.get_world_size()
    out = []
    for t in tensors:
        r = t.detach().clone()
        dist.all_reduce(r, op=dist.ReduceOp.SUM)
        out.append(r / world)
    return out


def all_finite(acc: Any, value: "float | Tensor") -> bool:
    """True when `value` (a number or a tensor, all elements) is finite on every process of the Accelerator
    `acc`, so that all processes take the same branch (skip or step)."""
    ok = bool(torch.isfinite(value.detach()).all()) if isinstance(value, Tensor) else math.isfinite(value)
    flag = torch.tensor([0.0 if ok else 1.0], device=acc.device)
    if acc.num_processes > 1:
        flag = acc.reduce(flag, reduction="sum")
    return bool(flag.item() == 0)


def mean_logs(logs: Dict[str, float], device: Any = "cpu") -> Dict[str, float]:
    """Scalar logs averaged over ranks (one all-reduce), so a run logs its global-batch values."""
    if not _initialized() or not logs:
        return logs
    import torch.distributed as dist

    keys = sorted(logs)
    t = torch.tensor([float(logs[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def agree_stop(local: Optional[str], device: Any = "cpu") -> Optional[str]:
    """The stop request agreed by all ranks: a signal name if any rank saw one, else None.

    Call it at the same point of every step on every rank (one tiny all-reduce). In one process
    it returns `local`.
    """
    if not _initialized():
        return local
    import torch.distributed as dist

    code = 0
    if local:
        try:
            code = int(signal.Signals[local])
        except KeyError:
            code = int(signal.SIGTERM)
    flag = torch.tensor([code], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    got = int(flag.item())
    if got == 0:
        return None
    return local or signal.Signals(got).name


_PEER_WORDS = ("connection", "closed", "reset", "broken pipe", "timed out", "timeout", "peer", "gloo", "nccl")


def raise_if_peer_lost(exc: BaseException, what: str = "the run") -> None:
    """Raise :class:`PeerLostError` (one line) when `exc` is a collective that failed because another
    rank of a multi-process run died; return otherwise (the caller re-raises `exc`)."""
    if isinstance(exc, XQError) or not isinstance(exc, (RuntimeError, OSError)):
        return
    text = str(exc).strip()
    if not (_initialized() or "dist" in type(exc).__module__.lower()):
        return
    if any(w in text.lower() for w in _PEER_WORDS):
        first = text.splitlines()[0] if text else type(exc).__name__
        first = re.sub(r"^\[[^\]]*\]\s*", "", first)[:120]  # drop gloo's "[.../pair.cc:545]" prefix
        raise PeerLostError(
            f"another process of {what} stopped ({first}); this process stops too; resume with --resume auto"
        ) from None


@contextlib.contextmanager
def peer_guard(what: str = "the run") -> Iterator[None]:
    """Context manager form of :func:`raise_if_peer_lost`."""
    try:
        yield
    except (RuntimeError, OSError) as exc:
        raise_if_peer_lost(exc, what)
        raise


__all__ = ["LaunchError", "PeerLostError", "agree_stop", "broadcast_modules", "check_launch", "describe",
           "main_process_only", "mean_across", "mean_logs", "peer_guard", "process_state", "raise_if_peer_lost",
           "use_cpu_requested"]
