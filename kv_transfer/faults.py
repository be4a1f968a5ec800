"""Fault injection at the transfer layer, for chaos testing (`make soak`): writes delayed, and
writes dropped (failed without landing), at random.

A worker wraps its engine when ``PDSERVE_TRANSFER_FAULTS`` is set, e.g.
``delay_ms=50,drop=0.02,seed=7``: every ``batch_transfer_sync_write`` call first sleeps a
uniform 0..``delay_ms``, and with probability ``drop`` fails (-1) without writing. Never set in
production; the worker logs a warning when it is.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass

from kv_transfer.transfer_engine import TransferEngine

ENV = "PDSERVE_TRANSFER_FAULTS"


@dataclass(frozen=True)
class TransferFaults:
    delay_ms: float = 0.0
    drop: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or not 0 <= self.drop <= 1:
            raise ValueError(
                f"{ENV}: delay_ms must be >= 0 and drop in [0, 1], got {self.delay_ms}, {self.drop}"
            )

    @classmethod
    def parse(cls, text: str) -> TransferFaults:
        """``"delay_ms=50,drop=0.02,seed=7"`` (any subset); ValueError naming a bad item."""
        values: dict[str, float] = {}
        for item in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = item.partition("=")
            if not sep or key not in ("delay_ms", "drop", "seed"):
                raise ValueError(f"{ENV}: {item!r} is not delay_ms=, drop= or seed=")
            try:
                values[key] = float(value)
            except ValueError:
                raise ValueError(f"{ENV}: {item!r} needs a number") from None
        return cls(
            delay_ms=values.get("delay_ms", 0.0),
            drop=values.get("drop", 0.0),
            seed=int(values.get("seed", 0)),
        )


class FaultyTransferEngine(TransferEngine):
    """``inner`` with its batch writes delayed and dropped as ``faults`` says."""

    def __init__(self, inner: TransferEngine, faults: TransferFaults) -> None:
        self.inner = inner
        self.faults = faults
        self._rng = random.Random(faults.seed)
        self._lock = threading.Lock()
        self.dropped = 0

    def initialize(
        self, local_hostname: str, metadata_server: str, protocol: str, device_name: str
    ) -> int:
        return self.inner.initialize(local_hostname, metadata_server, protocol, device_name)

    def get_rpc_port(self) -> int:
        return self.inner.get_rpc_port()

    def register_memory(self, addr: int, length: int) -> int:
        return self.inner.register_memory(addr, length)

    def unregister_memory(self, addr: int) -> int:
        return self.inner.unregister_memory(addr)

    def transfer_sync_write(self, session_id: str, src: int, dst: int, length: int) -> int:
        return self.batch_transfer_sync_write(session_id, [src], [dst], [length])

    def batch_transfer_sync_write(
        self, session_id: str, srcs: list[int], dsts: list[int], lengths: list[int]
    ) -> int:
        with self._lock:
            delay = self._rng.uniform(0, self.faults.delay_ms) / 1000
            drop = self._rng.random() < self.faults.drop
        if delay:
            time.sleep(delay)
        if drop:
            self.dropped += 1
            return -1
        return self.inner.batch_transfer_sync_write(session_id, srcs, dsts, lengths)

    @property
    def session_id(self) -> str:
        return self.inner.session_id
