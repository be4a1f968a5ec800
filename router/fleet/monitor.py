"""Watching the members: periodic health and load checks, and re-reading a worker's identity.

Every ``check_interval_s`` the ``HealthMonitor`` calls ``grpc.health.v1`` Check and then
``GetLoad`` on every member of its pool. No answer counts as a failure on the worker's circuit
breaker (NOT_SERVING only marks it unhealthy); SERVING is a success for a half-open breaker.
A worker that may be another process now (its session broke, it came back from silence, its
load report names another instance) is *unverified*: it takes no requests until its
``GetInfo`` passes the pool's checks again (``router.fleet.compat``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from router.fleet.breaker import CircuitState
from router.fleet.compat import WorkerRefused, WorkerUnreachable, read_info
from router.fleet.health import HealthConfig
from router.fleet.worker import Health, WorkerClient

if TYPE_CHECKING:
    from router.fleet.pool import WorkerPool

log = logging.getLogger(__name__)


def record_failure(worker: WorkerClient, why: str) -> None:
    """Count a failure on ``worker``'s breaker; log when that opens it."""
    before = worker.breaker.state
    worker.breaker.record_failure()
    if before is not CircuitState.OPEN and worker.breaker.state is CircuitState.OPEN:
        log.warning("circuit of worker %s opened (%s)", worker.endpoint, why)


class HealthMonitor:
    """Health, load and identity checks over ``pool``'s members."""

    def __init__(self, pool: WorkerPool, config: HealthConfig) -> None:
        self.pool = pool
        self.config = config
        self._checker: asyncio.Task[None] | None = None
        self._verifying: set[str] = set()  # members whose identity is being re-read
        self._refusals: dict[str, str] = {}  # why a reconnected member stays out (logged once)

    def start(self) -> None:
        """Check every member's health and load every ``check_interval_s`` until ``close``."""
        if self._checker is None:
            self._checker = asyncio.create_task(self._check_forever())

    async def close(self) -> None:
        if self._checker is not None:
            self._checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checker

    async def _check_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.check_interval_s)
            try:
                await self.check_all()
            except Exception:
                log.exception("health check round failed")

    async def check_all(self) -> None:
        """One round: ``grpc.health.v1`` then ``GetLoad`` on every member, concurrently."""
        await asyncio.gather(*(self._check(w) for w in self.pool.all_workers))

    async def _check(self, worker: WorkerClient) -> None:
        timeout = self.config.check_timeout_s
        found = await worker.check_health(timeout)
        serving = found is Health.SERVING
        answered = found in (Health.SERVING, Health.NOT_SERVING)
        was = worker.healthy
        # No answer `failure_threshold` times in a row: gone (the breaker opens alike). One
        # silent check is not enough: a router that stalls for a moment misses every
        # worker's answer at once, and must not turn them all away together.
        gone_before = worker.silent_checks >= self.config.failure_threshold
        worker.silent_checks = 0 if answered else worker.silent_checks + 1
        if found is not Health.SILENT or worker.silent_checks >= self.config.failure_threshold:
            worker.healthy = serving  # an answer counts at once (NOT_SERVING: draining), and
            # so does a refused connection (nothing listens there any more)
        if answered and gone_before:
            self.unverified(worker)  # back after being gone: perhaps another process
        if not answered:
            record_failure(worker, f"health check: {found.value}")
        elif serving:
            worker.breaker.record_success(probe=True)
        if was != worker.healthy:
            now = "healthy" if serving else "unhealthy"
            log.warning("worker %s is now %s (%s)", worker.endpoint, now, found.value)
        if answered:
            await worker.poll_load(timeout)
            known = worker.info.instance_id if worker.info is not None else ""
            seen = worker.report.instance_id if worker.report is not None else ""
            if known and seen and seen != known and worker.verified:
                self.unverified(worker)
        if not worker.verified and serving:
            self.pool.spawn(self._reverify(worker))

    def unverified(self, worker: WorkerClient) -> None:
        """``worker`` may be another process now: no requests until its identity is re-read."""
        worker.verified = False
        self.pool.spawn(self._reverify(worker))

    async def _reverify(self, worker: WorkerClient) -> None:
        """Read a member's identity again and check it as at admission: model, weights,
        context length, layout fingerprint. It takes requests again only if all still hold;
        otherwise it stays out (logged once per reason) and the next health round tries
        again."""
        if worker.endpoint in self._verifying:
            return
        self._verifying.add(worker.endpoint)
        try:
            info = await read_info(worker, self.config.check_timeout_s * 5)
            self.pool.compat.check(info)
        except WorkerUnreachable:
            return  # not back yet
        except WorkerRefused as exc:
            reason = str(exc)
            if self._refusals.get(worker.endpoint) != reason:
                self._refusals[worker.endpoint] = reason
                log.warning("worker %s stays out of the pool after reconnecting: %s",
                            worker.endpoint, reason)  # fmt: skip
            return
        finally:
            self._verifying.discard(worker.endpoint)
        if worker.info is not None and info.instance_id != worker.info.instance_id:
            log.info("worker %s restarted (instance %s); identity re-checked", worker.endpoint,
                     info.instance_id or "?")  # fmt: skip
        self._refusals.pop(worker.endpoint, None)
        worker.reverified(info)

    async def health(self) -> dict[str, bool]:
        """``{endpoint: serving}`` for every member, checked now, concurrently."""
        workers = self.pool.all_workers
        states = await asyncio.gather(*(w.check_health() for w in workers))
        return {w.endpoint: s is Health.SERVING for w, s in zip(workers, states, strict=True)}
