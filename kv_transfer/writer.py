"""Issuing write batches through a `TransferEngine` within what Mooncake's TCP transport takes.

Mooncake's TCP transport queues at most 1,024 writes per peer, with 1,024 more waiting up to 1 s
for admission (`MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER`, `MC_TCP_MAX_PENDING_ADMISSIONS_PER_PEER`,
`MC_TCP_ADMISSION_TIMEOUT_MS`). Past that, calls fail with -1, and afterwards that engine may be
unable to write to that peer at all (seen for 45 s and counting; a fresh engine can). This holds
for one oversized batch and for several concurrent batches to one peer (8 threads x 512 writes
failed, after 30 s). Hence: at most `MAX_WRITES_PER_CALL` writes per call, one call in flight
per peer.
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager, nullcontext

from kv_transfer.fence import WriteFence
from kv_transfer.pages import WriteBatch
from kv_transfer.transfer_engine import TransferEngine, check

MAX_WRITES_PER_CALL = 512


def write_batch(
    engine: TransferEngine,
    session_id: str,
    batch: WriteBatch,
    *,
    max_writes_per_call: int = MAX_WRITES_PER_CALL,
    fence: WriteFence | None = None,
    transfer_id: int = 0,
) -> None:
    """Issue `batch` to `session_id` as `batch_transfer_sync_write` calls of at most
    `max_writes_per_call` entries, one after another; blocks (without holding the GIL, for
    Mooncake) until all have landed. Raises `TransferError` at the first failed call: some pages
    may then hold new bytes and others old ones, so the receiver must drop them all.

    With a `fence`, each call first checks that `transfer_id` is not revoked (raising
    `TransferRevoked` before writing anything more) and holds it open until the call returns.

    Not safe to run concurrently with other writes to the same peer through the same engine;
    `PageWriter` serializes them."""
    for part in batch.chunks(max_writes_per_call):
        guard: AbstractContextManager[None] = (
            nullcontext() if fence is None else fence.writing(transfer_id)
        )
        with guard:
            rc = engine.batch_transfer_sync_write(session_id, part.srcs, part.dsts, part.lengths)
        if rc != 0:  # the message sums every length: only on failure
            check(
                rc,
                f"batch_transfer_sync_write of {len(part)} writes ({part.total_bytes} bytes) "
                f"to {session_id}",
            )


class PageWriter:
    """`write_batch` through one engine, with at most one call in flight per peer.

    Thread-safe: call `write` from any number of threads (e.g. `asyncio.to_thread`); writes to
    different peers run in parallel, writes to one peer one batch after another.
    """

    def __init__(
        self,
        engine: TransferEngine,
        *,
        max_writes_per_call: int | None = None,
        fence: WriteFence | None = None,
    ) -> None:
        """`max_writes_per_call`: None takes the engine's own `max_writes_per_call` if it has
        one (a backend without Mooncake's TCP limit), else `MAX_WRITES_PER_CALL`. Every write
        goes through `fence` (a fresh one unless given): the transfer ids the decode side
        revoked are written no more."""
        if max_writes_per_call is None:
            max_writes_per_call = int(getattr(engine, "max_writes_per_call", MAX_WRITES_PER_CALL))
        if max_writes_per_call < 1:
            raise ValueError(f"max_writes_per_call must be >= 1, got {max_writes_per_call}")
        self.engine = engine
        self.fence = WriteFence() if fence is None else fence
        self.max_writes_per_call = max_writes_per_call
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    def _peer_lock(self, session_id: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(session_id, threading.Lock())

    def write(self, session_id: str, batch: WriteBatch, transfer_id: int = 0) -> None:
        """Write every entry of `batch` to `session_id` for `transfer_id`; raises
        `TransferError` on failure and `TransferRevoked` once the transfer is revoked."""
        with self._peer_lock(session_id):
            write_batch(
                self.engine,
                session_id,
                batch,
                max_writes_per_call=self.max_writes_per_call,
                fence=self.fence,
                transfer_id=transfer_id,
            )
