"""Graceful interruption: Ctrl-C or SIGTERM asks the training loop to checkpoint and exit.

The signal handler only sets a flag; the loop checks it after every optimizer step, saves
``last.pt`` and returns, so ``--resume`` continues from exactly that step. A second Ctrl-C
while the checkpoint is being written aborts immediately (the write is atomic, so the
previous checkpoint survives).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

__all__ = ["StopFlag", "stop_on_signals"]


class StopFlag:
    """Set by a signal (or by code, e.g. tests) to ask the training loop to stop cleanly.

    Attributes:
        requested: Whether a stop was asked for.
        reason: What asked for it.
    """

    def __init__(self) -> None:
        self.requested = False
        self.reason = ""

    def request(self, reason: str) -> None:
        """Ask the loop to checkpoint and stop after the current step."""
        self.requested = True
        self.reason = reason


@contextmanager
def stop_on_signals(flag: StopFlag) -> Iterator[StopFlag]:
    """Route SIGINT and SIGTERM to ``flag`` for the duration of the block.

    The previous handlers are restored on exit. Outside the main thread (where Python
    cannot install handlers) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    signals = [signal.SIGINT, signal.SIGTERM]
    previous = {sig: signal.getsignal(sig) for sig in signals}

    def handler(signum: int, frame: FrameType | None) -> None:
        if flag.requested:  # second signal: give up waiting for the checkpoint
            raise KeyboardInterrupt
        flag.request(signal.Signals(signum).name)

    for sig in signals:
        signal.signal(sig, handler)
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
