"""The sending side's fence: which transfers may still be written, checked before every write.

A decode worker that gives up on a transfer (deadline passed, request cancelled, router gave
up) cannot make a one-sided write stop: over Mooncake the bytes are pushed by the sender's
engine, and no backend asks the receiver before landing them. So the decode worker keeps the
transfer's pages out of use (quarantined) and revokes the transfer at the sender. The sender's
`WriteFence` makes the revocation hold:

- `revoke(tid)` marks the transfer revoked (a tombstone, kept long enough to outlive any late
  message that names it); from then on no write of it starts (`writing` raises
  `TransferRevoked`), and a destination attached later for it is refused;
- `wait_idle(tid)` returns once no write of it is still running.

When both hold, the sender acknowledges, and only then does the decode worker reuse the pages.
The check sits above the backend (`kv_transfer.writer` takes the fence around each
`batch_transfer_sync_write` call), so every backend that speaks the `TransferEngine` API gets it
as it is: Mooncake over TCP or RDMA, and a same-host device backend. The transfer id is the
allocation's generation: the router draws a fresh random one per attempt, and the decode worker
never gives a quarantined page to another transfer before the acknowledgement.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from kv_transfer.transfer_engine import TransferError

# How long a revoked transfer id is remembered: far longer than any message naming it can be
# delayed (every RPC between workers has a deadline of seconds).
DEFAULT_TOMBSTONE_S = 600.0
DEFAULT_MAX_TOMBSTONES = 100_000


class TransferRevoked(TransferError):
    """The decode worker gave up on this transfer: nothing more may be written for it."""

    def __init__(self, transfer_id: int) -> None:
        super().__init__(f"transfer {transfer_id} was revoked by its decode worker")
        self.transfer_id = transfer_id


class WriteFence:
    """Revoked transfer ids and the writes in flight per transfer id. Thread-safe: writes run
    in worker threads, revocations come from the event loop."""

    def __init__(
        self,
        *,
        tombstone_s: float = DEFAULT_TOMBSTONE_S,
        max_tombstones: int = DEFAULT_MAX_TOMBSTONES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if tombstone_s <= 0 or max_tombstones < 1:
            raise ValueError(
                f"tombstone_s must be > 0 and max_tombstones >= 1, got {tombstone_s}, "
                f"{max_tombstones}"
            )
        self._tombstone_s = tombstone_s
        self._max_tombstones = max_tombstones
        self._clock = clock
        self._cond = threading.Condition()
        self._revoked: OrderedDict[int, float] = OrderedDict()  # transfer id -> revoked at
        self._active: dict[int, int] = {}  # transfer id -> writes in flight

    def is_revoked(self, transfer_id: int) -> bool:
        with self._cond:
            self._prune()
            return transfer_id in self._revoked

    @contextmanager
    def writing(self, transfer_id: int) -> Iterator[None]:
        """Hold the transfer open for one write call: raises `TransferRevoked` (writing
        nothing) if it is revoked; a `revoke` meanwhile waits for the call to end."""
        with self._cond:
            if transfer_id in self._revoked:
                raise TransferRevoked(transfer_id)
            self._active[transfer_id] = self._active.get(transfer_id, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                left = self._active[transfer_id] - 1
                if left:
                    self._active[transfer_id] = left
                else:
                    del self._active[transfer_id]
                    self._cond.notify_all()

    def revoke(self, transfer_id: int) -> bool:
        """Refuse every later write of `transfer_id`; returns whether a write of it is still
        running (then `wait_idle` before telling the decode worker the pages are safe)."""
        with self._cond:
            self._prune()
            self._revoked[transfer_id] = self._clock()
            self._revoked.move_to_end(transfer_id)
            while len(self._revoked) > self._max_tombstones:
                self._revoked.popitem(last=False)
            return transfer_id in self._active

    def wait_idle(self, transfer_id: int, timeout_s: float) -> bool:
        """Block until no write of `transfer_id` runs; False if one still does after
        `timeout_s` (a write stuck on a peer that stopped answering)."""
        with self._cond:
            return self._cond.wait_for(lambda: transfer_id not in self._active, timeout_s)

    def _prune(self) -> None:
        oldest = self._clock() - self._tombstone_s
        while self._revoked:
            tid, at = next(iter(self._revoked.items()))
            if at >= oldest:
                break
            del self._revoked[tid]

    def __len__(self) -> int:
        """Remembered revocations."""
        with self._cond:
            return len(self._revoked)
