"""SIGINT and SIGTERM end a training run at the end of a step, with a checkpoint, not a traceback."""

import contextlib
import signal
import threading
import typing as tp

import torch

from .distributed import Distributed

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """The first SIGINT or SIGTERM a run receives; a second SIGINT stops at once (KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def agreed(self, dist: Distributed) -> int | None:
        """The signal to stop on, agreed by every process (so that all stop after the same step):
        the highest any of them received (SIGTERM over SIGINT)."""
        signum = self.signum  # read once: the handler may run at any time
        if not dist.enabled:
            return signum
        highest = int(dist.all_reduce_max(torch.tensor([signum or 0], device=dist.device)).item())
        return highest or None


@contextlib.contextmanager
def stop_on_signals() -> tp.Iterator[StopRequest]:
    """Catch SIGINT and SIGTERM while the block runs (in the main thread; elsewhere, nothing)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.signal(s, request._handle) for s in SIGNALS}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
