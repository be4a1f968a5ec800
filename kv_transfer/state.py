"""Per-transfer state machines of the KV hand-off, and the table that finds them by transfer id.

Prefill side (`KVSender`), one per transfer:
    BOOTSTRAPPING --attach(dest)--> WAITING_FOR_INPUT --begin()--> TRANSFERRING --succeed()-->
    SUCCESS; fail() or a timeout moves any unfinished state to FAILED.
    BOOTSTRAPPING waits for the decode worker's destination; WAITING_FOR_INPUT for this worker's
    prefill to produce the KV; TRANSFERRING for the writes.

Decode side (`KVReceiver`), one per transfer:
    BOOTSTRAPPING --bootstrapped()--> WAITING_FOR_INPUT --complete(payload)--> SUCCESS;
    fail() or a timeout moves any unfinished state to FAILED.

Every wait takes a timeout: a transfer stuck in a waiting state fails with `TransferTimeout`
rather than holding its pages forever. The machines are asyncio objects: call them from the
event loop's thread (from another thread, through `loop.call_soon_threadsafe`).
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar, Generic, TypeVar

from kv_transfer.layout import KVPoolDescriptor
from kv_transfer.transfer_engine import TransferError


class TransferState(enum.Enum):
    BOOTSTRAPPING = "bootstrapping"
    WAITING_FOR_INPUT = "waiting_for_input"
    TRANSFERRING = "transferring"
    SUCCESS = "success"
    FAILED = "failed"


_TERMINAL = frozenset({TransferState.SUCCESS, TransferState.FAILED})


class TransferTimeout(TransferError):
    """A transfer sat in a waiting state for longer than its timeout."""

    def __init__(self, transfer_id: int, state: TransferState, timeout_s: float) -> None:
        super().__init__(
            f"transfer {transfer_id} timed out after {timeout_s:g} s in state {state.value}"
        )
        self.transfer_id = transfer_id
        self.state = state
        self.timeout_s = timeout_s


class TransferFailed(TransferError):
    """A transfer was failed on purpose (abort, write error, peer gone)."""

    def __init__(self, transfer_id: int, state: TransferState, reason: str) -> None:
        super().__init__(f"transfer {transfer_id} failed in state {state.value}: {reason}")
        self.transfer_id = transfer_id
        self.state = state
        self.reason = reason


@dataclass(frozen=True)
class Destination:
    """Where the decode worker wants one request's KV pages: sent to the prefill worker."""

    request_id: str
    transfer_id: int
    decode_endpoint: str  # the decode worker's gRPC address, for the completion message
    session_id: str  # the decode worker's transfer-engine session, "host:rpc_port"
    page_ids: tuple[int, ...]  # destination pages, in token order
    pool: KVPoolDescriptor  # the pool of the data-parallel rank that owns the request
    dp_rank: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.transfer_id < 2**63:
            raise ValueError(f"transfer_id must be in [0, 2**63), got {self.transfer_id}")
        if self.dp_rank < 0:
            raise ValueError(f"dp_rank must be >= 0, got {self.dp_rank}")
        for page in self.page_ids:
            if not 0 <= page < self.pool.num_pages:
                raise ValueError(
                    f"destination page {page} is outside the pool of {self.pool.num_pages} pages"
                )
        if len(set(self.page_ids)) != len(self.page_ids):
            raise ValueError(f"a destination page is named twice in {self.page_ids}")


class _TransferMachine:
    """States, legal transitions, failure and timed waits shared by sender and receiver."""

    _transitions: ClassVar[dict[TransferState, frozenset[TransferState]]]

    def __init__(self, transfer_id: int) -> None:
        self.transfer_id = transfer_id
        self._state = TransferState.BOOTSTRAPPING
        self._failure: TransferError | None = None
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def state(self) -> TransferState:
        return self._state

    @property
    def failure(self) -> TransferError | None:
        """Why the transfer failed (`TransferFailed` or `TransferTimeout`); None unless FAILED."""
        return self._failure

    def fail(self, reason: str) -> None:
        """Move to FAILED and wake every waiter with `TransferFailed`.

        Failing an already failed transfer keeps the first reason (abort, timeout and peer
        loss may race); failing a successful one raises `ValueError`.
        """
        if self._state is TransferState.FAILED:
            return
        self._fail(TransferFailed(self.transfer_id, self._state, reason))

    def _fail(self, failure: TransferError) -> None:
        self._move(TransferState.FAILED)
        self._failure = failure

    def _move(self, to: TransferState) -> None:
        allowed = self._transitions[self._state] | (
            frozenset() if self._state in _TERMINAL else {TransferState.FAILED}
        )
        if to not in allowed:
            raise ValueError(
                f"transfer {self.transfer_id}: illegal transition from {self._state.value} "
                f"to {to.value}"
            )
        self._state = to
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def _wait_while(self, states: Iterable[TransferState], timeout_s: float) -> None:
        """Wait until the state leaves `states`; time out (-> FAILED) after `timeout_s`.
        Raises the failure if the transfer is or becomes FAILED."""
        waiting = frozenset(states)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._state in waiting:
            remaining = deadline - loop.time()
            if remaining <= 0:
                self._fail(TransferTimeout(self.transfer_id, self._state, timeout_s))
                break
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except asyncio.TimeoutError:
                pass  # the loop re-checks the state, then the deadline
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        if self._failure is not None:
            raise self._failure.with_traceback(None)


class KVSender(_TransferMachine):
    """Prefill side of one transfer: learns the destination, then writes the pages there."""

    _transitions: ClassVar[dict[TransferState, frozenset[TransferState]]] = {
        TransferState.BOOTSTRAPPING: frozenset({TransferState.WAITING_FOR_INPUT}),
        TransferState.WAITING_FOR_INPUT: frozenset({TransferState.TRANSFERRING}),
        TransferState.TRANSFERRING: frozenset({TransferState.SUCCESS}),
        TransferState.SUCCESS: frozenset(),
        TransferState.FAILED: frozenset(),
    }

    def __init__(self, transfer_id: int) -> None:
        super().__init__(transfer_id)
        self._destination: Destination | None = None

    @property
    def destination(self) -> Destination | None:
        return self._destination

    def attach(self, dest: Destination) -> None:
        """The decode worker's destination arrived: BOOTSTRAPPING -> WAITING_FOR_INPUT."""
        if dest.transfer_id != self.transfer_id:
            raise ValueError(
                f"destination of transfer {dest.transfer_id} attached to transfer "
                f"{self.transfer_id}"
            )
        if self._state is not TransferState.BOOTSTRAPPING:
            raise ValueError(
                f"transfer {self.transfer_id}: attach in state {self._state.value}; a destination "
                "is accepted only while bootstrapping"
            )
        self._destination = dest
        self._move(TransferState.WAITING_FOR_INPUT)

    async def wait_for_destination(self, timeout_s: float) -> Destination:
        """The destination, once attached; `TransferTimeout` (-> FAILED) after `timeout_s`."""
        await self._wait_while({TransferState.BOOTSTRAPPING}, timeout_s)
        if self._destination is None:  # unreachable: leaving BOOTSTRAPPING needs attach or fail
            raise RuntimeError(f"transfer {self.transfer_id} left bootstrapping without a dest")
        return self._destination

    def begin(self) -> None:
        """The KV is computed and the writes start: WAITING_FOR_INPUT -> TRANSFERRING."""
        self._move(TransferState.TRANSFERRING)

    def succeed(self) -> None:
        """Every page has landed: TRANSFERRING -> SUCCESS."""
        self._move(TransferState.SUCCESS)

    async def wait(self, timeout_s: float) -> None:
        """Return once SUCCESS; raise the failure if FAILED, `TransferTimeout` (-> FAILED) if
        neither happens within `timeout_s`."""
        await self._wait_while(
            {
                TransferState.BOOTSTRAPPING,
                TransferState.WAITING_FOR_INPUT,
                TransferState.TRANSFERRING,
            },
            timeout_s,
        )


class KVReceiver(_TransferMachine):
    """Decode side of one transfer: sends its destination, then waits for the pages."""

    _transitions: ClassVar[dict[TransferState, frozenset[TransferState]]] = {
        TransferState.BOOTSTRAPPING: frozenset({TransferState.WAITING_FOR_INPUT}),
        TransferState.WAITING_FOR_INPUT: frozenset({TransferState.SUCCESS}),
        TransferState.TRANSFERRING: frozenset(),
        TransferState.SUCCESS: frozenset(),
        TransferState.FAILED: frozenset(),
    }

    def __init__(self, transfer_id: int) -> None:
        super().__init__(transfer_id)
        self._payload: object = None
        self._sender_done = False

    @property
    def sender_done(self) -> bool:
        """Whether the sender said it writes nothing more for this transfer (it completed, or
        reported its failure after its writes ended). False when this side gave up on its own
        (timeout, abort): a write may then still come, and the pages must not be reused until
        the sender acknowledges a revocation (`kv_transfer.fence`)."""
        return self._sender_done

    def bootstrapped(self) -> None:
        """The destination is on its way to the prefill worker: BOOTSTRAPPING ->
        WAITING_FOR_INPUT. Call it before the prefill worker can possibly answer."""
        self._move(TransferState.WAITING_FOR_INPUT)

    def complete(self, payload: object) -> None:
        """The prefill worker reports every page written (with e.g. the first token):
        WAITING_FOR_INPUT -> SUCCESS; `wait` returns `payload`."""
        self._move(TransferState.SUCCESS)
        self._payload = payload  # waiters run after this call returns
        self._sender_done = True

    def sender_failed(self, reason: str) -> None:
        """The sender reports the transfer failed and that its writes have ended: -> FAILED
        (no-op if already failed: then whether a write may still come is unchanged)."""
        if self._state is TransferState.FAILED:
            return
        self.fail(reason)
        self._sender_done = True

    async def wait(self, timeout_s: float) -> object:
        """The completion payload; raises the failure if FAILED, `TransferTimeout` (-> FAILED)
        if the transfer is not complete within `timeout_s`."""
        await self._wait_while(
            {TransferState.BOOTSTRAPPING, TransferState.WAITING_FOR_INPUT}, timeout_s
        )
        return self._payload


T = TypeVar("T")


class TransferTable(Generic[T]):
    """Live transfers by transfer id, each stamped with when it was created.

    Either side of a hand-off may be first to name a transfer (the decode worker's destination
    can reach the prefill worker before the prefill request does), hence `get_or_create`; and
    an entry whose other half never comes is dropped by `expire` instead of kept forever.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._entries: dict[int, tuple[float, T]] = {}

    @property
    def clock(self) -> Callable[[], float]:
        """The clock that stamps entries; pass `clock()` to `expire` as `now`."""
        return self._clock

    def get_or_create(self, transfer_id: int, factory: Callable[[], T]) -> T:
        entry = self._entries.get(transfer_id)
        if entry is None:
            entry = (self._clock(), factory())
            self._entries[transfer_id] = entry
        return entry[1]

    def get(self, transfer_id: int) -> T | None:
        entry = self._entries.get(transfer_id)
        return None if entry is None else entry[1]

    def pop(self, transfer_id: int) -> T | None:
        """Remove and return the entry, or None if there is none (cleanup paths may race)."""
        entry = self._entries.pop(transfer_id, None)
        return None if entry is None else entry[1]

    def expire(self, now: float, max_age_s: float) -> list[T]:
        """Drop and return the entries created more than `max_age_s` before `now`; the caller
        fails them and frees what they hold."""
        old = [tid for tid, (created, _) in self._entries.items() if now - created > max_age_s]
        return [self._entries.pop(tid)[1] for tid in old]

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, transfer_id: object) -> bool:
        return transfer_id in self._entries
