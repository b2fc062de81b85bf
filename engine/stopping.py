"""A clean stop on SIGTERM / SIGINT (what schedulers and Ctrl-C send): the run finishes its step,
writes a checkpoint and exits, on every rank at once.

The handler only records the signal; the training loop asks :meth:`StopSignals.agreed` at step
boundaries (a collective, so every rank stops at the same step). A single process blocked on
the loader (a slow or stuck worker, a run of undecodable batches) is released at once: the
handler raises :class:`engine.feeder.WaitInterrupted` while the feeder waits.
"""

from __future__ import annotations

import contextlib
import signal
from typing import Any, Callable, Iterator

import torch

from engine import distributed as dist_utils
from engine.distributed import DistInfo
from engine.feeder import WaitInterrupted


class StopSignals:
    """The stop signal received (``received``), and the one the ranks agreed to stop on (``stopped``)."""

    def __init__(self, info: DistInfo, device: torch.device, waiting: Callable[[], bool] = lambda: False) -> None:
        self.info, self.device, self.waiting = info, device, waiting
        self.received: int | None = None
        self.stopped: int | None = None

    def agreed(self) -> bool:
        """True on every rank when any rank received a signal (collective); sets ``stopped``."""
        if dist_utils.any_rank(self.received is not None, self.info, self.device):
            self.stopped = self.received or signal.SIGTERM
        return self.stopped is not None

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.received = signum
        if self.waiting() and not self.info.distributed:
            raise WaitInterrupted(signal.Signals(signum).name)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Handle SIGTERM and SIGINT inside the block (not on a thread other than the main one: no clean stop)."""
        previous = {}
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, self._on_signal)
        except ValueError:  # not the main thread
            pass
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
