"""A worker's load as the policies read it, and the score that orders workers by it.

Policies never ask a worker anything: they call a ``LoadFn`` (``load_of(worker)``) that the
pool gives them, which answers from what the router already knows: the requests it has in
flight on that worker (counted by the router, always fresh) and the worker's last ``GetLoad``
report (running and queued requests, free and total KV pages; possibly a little stale, and
absent until the first report arrives).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# A worker whose KV pool is (nearly) full scores as if 1/64 of it were free, so the score
# stays finite and such workers still order among themselves by request count.
MIN_FREE_FRACTION = 1 / 64


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    """What the router knows of one worker's load. ``num_total_pages == 0``: no report yet."""

    in_flight: int = 0  # requests this router sent there that have not ended
    num_running: int = 0  # from the last GetLoad report
    num_waiting: int = 0
    num_free_pages: int = 0
    num_total_pages: int = 0

    @property
    def requests(self) -> int:
        """Requests on the worker: the router's own count, or the report's when it sees more
        (other routers' requests). ``max``, not a sum: the report includes ours."""
        return max(self.in_flight, self.num_running + self.num_waiting)

    @property
    def free_fraction(self) -> float:
        """Free KV pages / total (1.0 before any report). Cached prefix pages count as free:
        the worker reclaims them on demand."""
        if self.num_total_pages <= 0:
            return 1.0
        return max(0.0, min(1.0, self.num_free_pages / self.num_total_pages))

    @property
    def score(self) -> float:
        """Lower is less loaded: ``(requests + num_waiting + 1) / free_fraction``.

        Requests per unit of free KV: queued requests count twice (each waits behind the
        running ones), and a worker with little free KV looks busy in proportion, so a
        nearly full pool is avoided even when it holds few (long) requests. With no report
        and nothing in flight every worker scores 1.0.
        """
        return (self.requests + self.num_waiting + 1) / max(self.free_fraction, MIN_FREE_FRACTION)


IDLE = WorkerLoad()

LoadFn = Callable[[Any], WorkerLoad]
"""``load_of(worker)``: the worker's current ``WorkerLoad``. Must not block (it runs inside
``Policy.pick`` on the event loop)."""


def no_load(worker: object) -> WorkerLoad:
    """The ``LoadFn`` of a pool that tracks no load: every worker idle."""
    return IDLE
