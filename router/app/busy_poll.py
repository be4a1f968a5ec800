"""Busy polling: the event loop keeps polling its sockets for a short window after client
traffic, instead of sleeping in ``epoll_wait`` until the next event (``--busy-poll-us``).

Why: at low concurrency every request wakes the router twice (the client's request, then the
worker's reply). Each wake-up is a context switch, on a VM an inter-processor interrupt, and
code that then runs on cold caches. On the 2-core benchmark machine that made a request cost
about 300 µs of router CPU at 1 connection against about 105 µs at 32. Polling through the
gaps trades CPU for latency, as the kernel's ``net.core.busy_poll`` does for sockets: the
router burns up to one core per process while traffic flows, and stops ``window`` after the
last request arrived or reply went out. Off by default.

How: while the window is open a callback reschedules itself with ``call_soon``; with a
callback ready the loop polls with a zero timeout rather than blocking. Timers, I/O and tasks
run between its turns as usual.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class BusyPoll:
    """Keeps the running loop polling until ``window_us`` after the last ``kick``."""

    def __init__(self, window_us: float, clock: Callable[[], float] = time.monotonic) -> None:
        if window_us <= 0:
            raise ValueError(f"--busy-poll-us must be > 0 to poll, got {window_us}")
        self.window_s = window_us / 1e6
        self._clock = clock
        self._loop = asyncio.get_running_loop()
        self._until = 0.0
        self.spinning = False
        self._closed = False

    def kick(self) -> None:
        """Client traffic: poll until the window after now has passed."""
        if self._closed:
            return
        self._until = self._clock() + self.window_s
        if not self.spinning:
            self.spinning = True
            self._loop.call_soon(self._turn)

    def close(self) -> None:
        """Stop polling (at the next turn) and ignore later kicks."""
        self._closed = True
        self._until = 0.0

    def _turn(self) -> None:
        if self._clock() < self._until:
            self._loop.call_soon(self._turn)
        else:
            self.spinning = False
