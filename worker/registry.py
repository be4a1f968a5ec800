"""A worker's entry in the Redis worker registry.

The worker writes `PREFIX:worker:<endpoint>` (a JSON object: endpoint, role, model, layout
fingerprint, capacity) with a TTL and rewrites it every TTL/3. A router watching the prefix
adds the worker while the key lives and drops it when the key expires; writing the whole key
each time (not just refreshing the TTL) brings it back after Redis itself restarts.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "pdserve"


@dataclass(frozen=True)
class WorkerRecord:
    endpoint: str
    role: str  # "prefill", "decode" or "null"
    model: str
    fingerprint: str
    context_length: int
    total_pages: int
    draining: bool = False

    def key(self, prefix: str) -> str:
        return f"{prefix}:worker:{self.endpoint}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str | bytes) -> WorkerRecord:
        return WorkerRecord(**json.loads(text))


class RedisRegistration:
    """Keeps one worker's record alive in Redis until `stop()`; survives Redis restarts."""

    def __init__(
        self, url: str, record: WorkerRecord, ttl_s: float = 10.0, prefix: str = DEFAULT_PREFIX
    ) -> None:
        if ttl_s < 1:
            raise ValueError(f"registry TTL must be >= 1 s, got {ttl_s}")
        self.record = record
        self.ttl_s = ttl_s
        self.prefix = prefix
        self.url = _without_password(url)  # for logs
        self._redis = aioredis.from_url(url, socket_timeout=ttl_s / 3)
        self._task: asyncio.Task[None] | None = None
        self._failing = False  # the last write failed (logged once until one succeeds)

    async def publish(self) -> None:
        await self._redis.set(
            self.record.key(self.prefix), self.record.to_json(), px=int(self.ttl_s * 1000)
        )

    async def start(self) -> None:
        """Register now, then keep refreshing. A Redis that cannot be reached now does not stop
        the worker: it serves (static routers reach it) and registers once Redis answers."""
        try:
            await self.publish()
        except (RedisError, OSError) as exc:
            self._failing = True
            log.warning(
                "registry %s unreachable (%s); serving anyway, registering when it answers "
                "(retried every %.1f s)",
                self.url, exc, self.ttl_s / 3,
            )  # fmt: skip
        self._task = asyncio.create_task(self._refresh())

    async def set_draining(self) -> None:
        """Tell routers to send no new requests; the entry stays until `stop`."""
        self.record = WorkerRecord(**{**asdict(self.record), "draining": True})
        try:
            await self.publish()
        except RedisError as exc:
            log.warning("could not mark %s draining in Redis: %s", self.record.endpoint, exc)

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            try:
                await self.publish()
            except (RedisError, OSError) as exc:
                if not self._failing:
                    log.warning("registry refresh failed (will retry): %s", exc)
                self._failing = True
            else:
                if self._failing:
                    log.info("registered in %s again", self.url)
                self._failing = False

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        try:
            await self._redis.delete(self.record.key(self.prefix))
        except (RedisError, OSError) as exc:
            log.warning("could not remove %s from Redis: %s", self.record.endpoint, exc)
        await self._redis.aclose()


def _without_password(url: str) -> str:
    """`url` with any password replaced, fit for a log line."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
