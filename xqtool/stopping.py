"""Graceful stop on SIGINT / SIGTERM for the trainers: save, then exit 130 / 143.

:class:`StopFlag` installs handlers (main thread only) that record the first signal; the training loop
checks :attr:`StopFlag.requested` after each optimizer step, saves a training state and returns with
status ``interrupted``; the CLI then exits with :func:`exit_code` (128 + signal number: 130 for SIGINT,
143 for SIGTERM), so ``train && encode`` chains and schedulers see the interruption. A second SIGINT
while stopping raises KeyboardInterrupt (writes are atomic, so nothing half-written is left).

Multi-process runs must agree on stopping (a signal may reach one rank only); :meth:`StopFlag.any_rank`
is the single place where that agreement happens.
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Dict, Optional

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(signal_name: Optional[str]) -> int:
    """Shell exit status for a run stopped by `signal_name` (``SIGINT`` → 130, ``SIGTERM`` → 143)."""
    if not signal_name:
        return 0
    return 128 + int(getattr(signal.Signals, signal_name))


class StopFlag:
    """Context manager recording SIGINT/SIGTERM; the previous handlers come back on exit."""

    def __init__(self) -> None:
        self.requested: Optional[str] = None
        self._old: Dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested == "SIGINT" and name == "SIGINT":
            raise KeyboardInterrupt
        self.requested = self.requested or name

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._old[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def any_rank(self, accelerator: Any = None) -> Optional[str]:
        """The stop request agreed by all processes: a signal name if any rank saw one, else None.

        Multi-process runs make one tiny all-reduce here (:func:`xqtool.distributed.agree_stop`), so every
        rank must call this at the same points of its loop; one process returns its own request.
        """
        from xqtool.distributed import agree_stop

        device = getattr(accelerator, "device", "cpu") if accelerator is not None else "cpu"
        agreed = agree_stop(self.requested, device)
        if agreed and not self.requested:
            self.requested = agreed  # this rank stops (and exits) as the rank that saw the signal
        return agreed

    @property
    def exit_code(self) -> int:
        return exit_code(self.requested)


__all__ = ["STOP_SIGNALS", "StopFlag", "exit_code"]
