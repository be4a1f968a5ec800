"""Watching the Redis worker registry: workers whose record appears join the pool; workers
whose record vanishes (expired: the worker stopped refreshing it; or deleted) leave it.

Workers write ``PREFIX:worker:<endpoint>`` = a JSON record (endpoint, role, model, KV layout
fingerprint, context length, pages, draining) with a TTL and rewrite it every TTL/3
(``worker.registry``). The watcher polls: every ``poll_interval_s`` it SCANs the prefix
and GETs the records. Polling is simple and survives anything (Redis restarts, lost
connections, keys written while nobody listened) where keyspace notifications would not.

- A new record: ``WorkerPool.admit`` (GetInfo plus the compatibility checks). A refused or
  unreachable worker is logged once per distinct record and tried again on later polls.
- ``draining: true``: the worker takes no new requests (it is shutting down).
- A registry worker whose key is gone leaves the pool. Static and admin-added workers are
  never removed by the registry.
- Redis unreachable: nothing changes (the router serves from what it knows) and removals stay
  suspended for ``resync_grace_s`` after it answers again, or after it restarted (its
  ``run_id`` changed): a restarted Redis is empty until the workers' next refresh.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from protos.contract import ROLES
from router.brief import short
from router.fleet.compat import WorkerRefused, WorkerUnreachable
from router.fleet.pool import WorkerPool
from router.fleet.worker import SOURCE_REGISTRY, endpoint_of

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "pdserve"


@dataclass(frozen=True)
class RegistryConfig:
    """Validated at construction: ValueError names the flag and the value."""

    url: str | None = None  # --registry; None: no registry
    prefix: str = DEFAULT_PREFIX  # --registry-prefix
    poll_interval_s: float = 1.0  # --registry-poll-interval
    resync_grace_s: float = 10.0  # --registry-resync-grace
    admit_timeout_s: float = 5.0  # GetInfo of a newly registered worker

    def __post_init__(self) -> None:
        if self.url is not None and not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"--registry must be a redis:// URL, got {self.url!r}")
        if not self.prefix:
            raise ValueError("--registry-prefix must not be empty")
        if not self.poll_interval_s > 0:
            raise ValueError(f"--registry-poll-interval must be > 0, got {self.poll_interval_s}")
        if self.resync_grace_s < 0:
            raise ValueError(f"--registry-resync-grace must be >= 0, got {self.resync_grace_s}")

    @staticmethod
    def add_args(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("worker registry")
        g.add_argument("--registry", metavar="URL", help="watch this Redis (redis://host:port/db)")
        g.add_argument("--registry-prefix", default=DEFAULT_PREFIX, help="key prefix")
        g.add_argument(
            "--registry-poll-interval", type=float, default=1.0, help="seconds between polls"
        )
        g.add_argument(
            "--registry-resync-grace",
            type=float,
            default=10.0,
            help="seconds without removals after Redis comes back or restarts (at least the "
            "workers' --registry-ttl / 3, their refresh period)",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RegistryConfig:
        return cls(
            url=args.registry,
            prefix=args.registry_prefix,
            poll_interval_s=args.registry_poll_interval,
            resync_grace_s=args.registry_resync_grace,
        )


@dataclass(frozen=True)
class RegistryRecord:
    """The JSON a worker writes (``worker.registry.WorkerRecord``); unknown fields are
    ignored so that workers may add some."""

    endpoint: str
    role: str
    model: str
    fingerprint: str
    context_length: int
    total_pages: int
    draining: bool = False

    @staticmethod
    def parse(raw: str | bytes, key_endpoint: str | None = None) -> RegistryRecord:
        """ValueError naming the problem when ``raw`` is not a worker record, or not the
        record of ``key_endpoint`` (what its key names). The endpoint comes back as
        ``host:port``, however the worker wrote it."""
        try:
            data = json.loads(raw)
        except ValueError as exc:  # the message names the position, not the document
            raise ValueError(f"not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"not a JSON object: {short(data)}")
        values: dict[str, Any] = {}
        for f in fields(RegistryRecord):
            value = values[f.name] = data.get(f.name, f.default)
            if value is MISSING:
                raise ValueError(f"{f.name} is missing")
            kind, what = _JSON_TYPES[str(f.type)]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ValueError(f"{f.name} must be {what}, got {short(value)}")
        if values["role"] not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {short(values['role'])}")
        endpoint = endpoint_of(values["endpoint"])  # ValueError when it is not host:port
        if key_endpoint is not None and not _same_endpoint(key_endpoint, endpoint):
            raise ValueError(f"its key names worker {short(key_endpoint)}, the record {endpoint}")
        return RegistryRecord(**{**values, "endpoint": endpoint})


# A record field's annotation (a string under ``from __future__ import annotations``) -> the
# Python type its JSON value must have, and how to say so.
_JSON_TYPES: dict[str, tuple[type, str]] = {
    "str": (str, "a string"), "int": (int, "an integer"), "bool": (bool, "true or false"),
}  # fmt: skip


def _same_endpoint(key_endpoint: str, endpoint: str) -> bool:
    try:
        return endpoint_of(key_endpoint) == endpoint
    except ValueError:
        return False


class RegistryWatcher:
    """Keeps the pool's registry members in step with the records under ``config.prefix``."""

    def __init__(
        self,
        config: RegistryConfig,
        pool: WorkerPool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if config.url is None:
            raise ValueError("RegistryWatcher needs a --registry URL")
        self.config = config
        self.pool = pool
        self._clock = clock
        self._redis = aioredis.from_url(
            config.url, socket_timeout=2.0, socket_connect_timeout=2.0, retry_on_timeout=False
        )
        self._pattern = f"{config.prefix}:worker:*"
        self._run_id: str | None = None
        self._reachable: bool | None = None  # None: not polled yet
        self._no_removal_until = 0.0
        self._admits: dict[str, asyncio.Task[None]] = {}
        # endpoint or key -> the record last complained about, while that key is there
        self._complaints: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None

    async def poll(self, wait_admits: bool = False) -> bool:
        """One poll; False if Redis could not be read (nothing changed then)."""
        try:
            records, keys = await self._read()
        except (RedisError, OSError) as exc:
            if self._reachable is not False:
                log.warning("worker registry %s unreachable (serving from what we know): %s",
                            self.config.url, exc)  # fmt: skip
            self._reachable = False
            self._set_up(False)
            return False
        if self._reachable is False:
            log.info("worker registry %s reachable again; re-syncing", self.config.url)
            self._hold_removals()
        self._reachable = True
        self._set_up(True)
        self._apply(records, keys)
        if wait_admits and self._admits:
            await asyncio.gather(*self._admits.values(), return_exceptions=True)
        return True

    async def _read(self) -> tuple[dict[str, RegistryRecord], set[str]]:
        """The records by endpoint, and the names of every key under the prefix."""
        info = await self._redis.info("server")
        run_id = str(info.get("run_id", ""))
        if self._run_id is not None and run_id != self._run_id:
            log.info("worker registry restarted (run_id changed); re-syncing")
            self._hold_removals()
        self._run_id = run_id
        keys = sorted({key async for key in self._redis.scan_iter(match=self._pattern, count=200)})
        values = await self._redis.mget(keys) if keys else []
        records: dict[str, RegistryRecord] = {}
        names = set()
        prefix = len(self._pattern) - 1  # the key minus "PREFIX:worker:" names the worker
        for key, raw in zip(keys, values, strict=True):
            name = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
            names.add(name)
            if raw is None:
                continue  # expired between SCAN and MGET, or not a string key
            try:
                record = RegistryRecord.parse(raw, name[prefix:])
                if record.endpoint in records:
                    raise ValueError(f"worker {record.endpoint} has a record under another key")
            except ValueError as exc:
                self._complain(name, str(raw), f"ignoring registry key {short(name)}: {exc}")
                continue
            records[record.endpoint] = record
        return records, names

    def _hold_removals(self) -> None:
        self._no_removal_until = self._clock() + self.config.resync_grace_s

    def _apply(self, records: dict[str, RegistryRecord], keys: set[str]) -> None:
        pool = self.pool
        for endpoint, record in records.items():
            member = pool.get(endpoint)
            if member is not None:
                if member.role != record.role:
                    self._complain(
                        endpoint, repr(record), f"worker {endpoint} is in the pool as "
                        f"{member.role}; its registry record says {record.role} (ignored)",
                    )  # fmt: skip
                draining = record.draining or member.leave_when_idle
                if member.source == SOURCE_REGISTRY and member.draining != draining:
                    member.draining = draining
                    log.info("worker %s %s (registry)", endpoint,
                             "draining" if draining else "no longer draining")  # fmt: skip
                continue
            if endpoint in pool.evicted or endpoint in self._admits or record.draining:
                continue
            self._admits[endpoint] = asyncio.create_task(self._admit(record))
        # Forget what concerned records that are gone.
        pool.evicted &= set(records)
        for gone in set(self._complaints) - set(records) - keys:
            del self._complaints[gone]
        if self._clock() < self._no_removal_until:
            return
        for member in pool.all_workers:
            if member.source == SOURCE_REGISTRY and member.endpoint not in records:
                pool.remove(member.endpoint, "its registry record expired or was deleted")

    async def _admit(self, record: RegistryRecord) -> None:
        try:
            await self.pool.admit(
                record.endpoint, record.role, SOURCE_REGISTRY, self.config.admit_timeout_s
            )
            self._complaints.pop(record.endpoint, None)
        except WorkerRefused as exc:
            self._complain(record.endpoint, repr(record), f"refusing registered worker: {exc}")
        except (WorkerUnreachable, ValueError) as exc:
            self._complain(record.endpoint, repr(record), f"cannot add registered worker: {exc}",
                           level=logging.WARNING)  # fmt: skip
        finally:
            self._admits.pop(record.endpoint, None)

    def _complain(self, key: str, what: str, message: str, level: int = logging.ERROR) -> None:
        """Log once per distinct record, not once per poll."""
        if self._complaints.get(key) != what:
            self._complaints[key] = what
            log.log(level, "%s", message)

    def _set_up(self, up: bool) -> None:
        if self.pool.metrics is not None:
            self.pool.metrics.registry_up().set(1 if up else 0)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._poll_forever())

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_interval_s)
            try:
                await self.poll()
            except Exception:
                log.exception("registry poll failed")

    async def close(self) -> None:
        tasks: list[asyncio.Task[Any]] = [*self._admits.values()]
        if self._task is not None:
            tasks.append(self._task)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._redis.aclose()
