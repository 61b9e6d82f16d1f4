"""One generation at a time, the others waiting in a bounded line, first come first served.

The runtime serves one sequence (batch 1): a second request waits for the model instead of
being interleaved with the first. The line is bounded so a burst cannot pile up requests
that would time out anyway: past the bound a request is refused at once with a hint of when
to retry. A waiting request whose client went away, or a server that is closing, leaves
the line.
"""

from __future__ import annotations

import collections
import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator


class QueueFull(Exception):
    """The line is at its bound; `retry_after_s` is a guess of when a place frees up."""

    def __init__(self, waiting: int, retry_after_s: int):
        super().__init__(f"{waiting} requests are already waiting for the model")
        self.waiting, self.retry_after_s = waiting, retry_after_s


class Closed(Exception):
    """The server is shutting down: no more turns."""


class Gone(Exception):
    """The client left while its request was waiting."""


class Turns:
    """`with turns.turn(gone):` waits for the model, then holds it for the block."""

    POLL_S = 0.2  # how often a waiter asks whether its client is still there

    def __init__(self, max_waiting: int):
        if max_waiting < 0:
            raise ValueError(f"max_waiting={max_waiting} must be >= 0")
        self.max_waiting = max_waiting
        self._cond = threading.Condition()
        self._line: collections.deque[object] = collections.deque()
        self._busy = False
        self._closed = False
        self._recent_s: collections.deque[float] = collections.deque(maxlen=8)  # how long recent turns took

    @property
    def waiting(self) -> int:
        return len(self._line)

    @property
    def busy(self) -> bool:
        return self._busy

    @contextlib.contextmanager
    def turn(self, gone: Callable[[], bool] = lambda: False) -> Iterator[None]:
        ticket = object()
        with self._cond:
            if self._closed:
                raise Closed
            if (self._busy or self._line) and len(self._line) >= self.max_waiting:
                raise QueueFull(len(self._line), self._retry_after(len(self._line)))
            self._line.append(ticket)
            try:
                while self._busy or self._line[0] is not ticket:
                    self._cond.wait(self.POLL_S)
                    if self._closed:
                        raise Closed
                    if gone():
                        raise Gone
            finally:
                self._line.remove(ticket)
                self._cond.notify_all()  # the next in line may be first now
            self._busy = True
        started = time.perf_counter()
        try:
            yield
        finally:
            with self._cond:
                self._recent_s.append(time.perf_counter() - started)
                self._busy = False
                self._cond.notify_all()

    def close(self) -> None:
        """Refuse new turns and send the waiting away (the turn being held runs on)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _retry_after(self, waiting: int) -> int:
        """Seconds until this request would have had its turn, at the pace of recent turns."""
        mean = sum(self._recent_s) / len(self._recent_s) if self._recent_s else 1.0
        return max(1, math.ceil(mean * (waiting + 1)))
