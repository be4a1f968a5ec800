"""Who may call the router: API keys, per-key rate limits, and a cap on failed attempts.

- **Keys** come from ``PDSERVE_API_KEY`` (comma-separated) and ``--api-key-file`` (one key per
  line, ``#`` comments), never only from the command line, where ``ps`` shows them. With none
  the inference API is open (as before). A request sends ``Authorization: Bearer KEY``; a
  missing or wrong key is a 401 in OpenAI's shape (``invalid_api_key``). Keys are compared as
  SHA-256 digests with ``hmac.compare_digest`` against every key, so the time taken says
  nothing about how much of a key matched or which key it was. ``/health`` and ``/metrics``
  stay open (probes and Prometheus).
- **Failed attempts** (a wrong inference or admin key) are counted per client address: beyond
  ``--auth-failures-per-minute`` in the last minute that address gets 429 with
  ``Retry-After`` until the oldest failure is a minute old, whatever key it sends.
- **Per-key limits**: ``--rate-limit-rps`` requests per second (a token bucket that holds a
  second's worth) and ``--rate-limit-tpm`` tokens per minute (prompt plus completion tokens,
  charged when a request ends; a key in debt waits until the minute's refill pays it off).
  Beyond either: 429 ``rate_limit_exceeded`` with ``Retry-After``. Under ``--processes N``
  each process enforces 1/N of each limit.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from pathlib import Path

from router.app.admission import Overloaded
from router.app.errors import RequestError
from router.app.http import Connection
from router.app.routes import Reply, Request

Handler = Callable[[Request, Connection], Awaitable[Reply]]

ENV_API_KEY = "PDSERVE_API_KEY"
ENV_ADMIN_KEY = "PDSERVE_ADMIN_KEY"
FAILURE_WINDOW_S = 60.0
MAX_TRACKED_ADDRESSES = 10_000  # failure counts kept; the oldest address is dropped beyond


def read_keys(env_value: str | None, key_file: str | None) -> tuple[str, ...]:
    """Keys from an environment value (comma-separated) and a file (one per line, ``#``
    comments, blank lines skipped). ValueError naming the file when it cannot be read."""
    keys = [k.strip() for k in (env_value or "").split(",")]
    if key_file is not None:
        try:
            text = Path(key_file).read_text()
        except OSError as exc:
            raise ValueError(f"cannot read the key file {key_file!r}: {exc.strerror}") from None
        keys += [line.split("#", 1)[0].strip() for line in text.splitlines()]
    return tuple(dict.fromkeys(k for k in keys if k))


def env_keys(name: str) -> str | None:
    return os.environ.get(name)


def unauthorized(message: str) -> RequestError:
    return RequestError(401, message, None, "invalid_api_key")


class RateLimited(Overloaded):
    """429 ``rate_limit_exceeded`` with a ``Retry-After`` of ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = max(1, math.ceil(retry_after_s))


class TokenBucket:
    """``rate`` units a second, holding at most ``burst``; the level may go below zero (a
    charge after the fact), and then nothing is taken until it is back above zero."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError(f"a token bucket needs rate and burst > 0, got {rate}, {burst}")
        self.rate = rate
        self.burst = burst
        self.level = burst
        self.updated = now

    def _refill(self, now: float) -> None:
        self.level = min(self.burst, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait_s(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` could be taken (0: now)."""
        self._refill(now)
        short = amount - self.level if amount > 0 else -self.level
        return max(0.0, short / self.rate)

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level -= amount


class FailedAttempts:
    """Failed authentications per client address over the last minute."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        if per_minute < 1:
            raise ValueError(f"--auth-failures-per-minute must be >= 1, got {per_minute}")
        self.per_minute = per_minute
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def check(self, address: str) -> None:
        """429 while ``address`` has used up its failures."""
        times = self._recent(address)
        if times is not None and len(times) >= self.per_minute:
            raise RateLimited(
                f"too many failed authentications from this address ({len(times)} in the "
                f"last minute, at most {self.per_minute}); retry later",
                times[0] + FAILURE_WINDOW_S - self._clock(),
            )

    def failed(self, address: str) -> None:
        times = self._recent(address)
        if times is None:
            times = self._failures[address] = deque()
            while len(self._failures) > MAX_TRACKED_ADDRESSES:
                self._failures.popitem(last=False)
        self._failures.move_to_end(address)
        times.append(self._clock())

    def _recent(self, address: str) -> deque[float] | None:
        times = self._failures.get(address)
        if times is None:
            return None
        oldest = self._clock() - FAILURE_WINDOW_S
        while times and times[0] < oldest:
            times.popleft()
        if not times:
            del self._failures[address]
            return None
        return times


class KeyLimits:
    """Each key's request and token buckets (0 turns a limit off)."""

    def __init__(self, rps: float, tpm: float, clock: Callable[[], float] = time.monotonic) -> None:
        if rps < 0 or tpm < 0:
            raise ValueError(
                f"--rate-limit-rps and --rate-limit-tpm must be >= 0, got {rps}, {tpm}"
            )
        self.rps = rps
        self.tpm = tpm
        self._clock = clock
        self._requests: dict[int, TokenBucket] = {}
        self._tokens: dict[int, TokenBucket] = {}

    @property
    def active(self) -> bool:
        return bool(self.rps or self.tpm)

    def admit(self, key: int) -> None:
        """Take one request of ``key``'s allowance, or raise ``RateLimited``."""
        now = self._clock()
        tokens = self._bucket(self._tokens, key, self.tpm / 60, self.tpm, now)
        if tokens is not None:
            wait = tokens.wait_s(0, now)
            if wait > 0:
                raise RateLimited(
                    f"this API key used its {self.tpm:g} tokens per minute; retry later", wait
                )
        requests = self._bucket(self._requests, key, self.rps, max(1.0, self.rps), now)
        if requests is not None:
            wait = requests.wait_s(1, now)
            if wait > 0:
                raise RateLimited(
                    f"this API key is limited to {self.rps:g} requests per second", wait
                )
            requests.take(1, now)

    def charge(self, key: int, tokens: int) -> None:
        """Count a finished request's prompt and completion tokens against ``key``."""
        now = self._clock()
        bucket = self._bucket(self._tokens, key, self.tpm / 60, self.tpm, now)
        if bucket is not None:
            bucket.take(tokens, now)

    @staticmethod
    def _bucket(
        buckets: dict[int, TokenBucket], key: int, rate: float, burst: float, now: float
    ) -> TokenBucket | None:
        if rate <= 0:
            return None
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = TokenBucket(rate, burst, now)
        return bucket


class KeyCheck:
    """Constant-time match of a presented bearer token against a set of keys."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def match(self, headers: Mapping[str, str]) -> int | None:
        """The index of the key sent as ``Authorization: Bearer KEY``; None if none matches.
        Every key is compared, whatever matched, in time independent of the key's bytes."""
        scheme, _, token = headers.get("authorization", "").partition(" ")
        given = hashlib.sha256(token.strip().encode()).digest()
        found = None
        for index, digest in enumerate(self._digests):
            if hmac.compare_digest(given, digest) and scheme.lower() == "bearer":
                found = index
        return found


_current_key: ContextVar[int | None] = ContextVar("pdserve_api_key", default=None)


class Authenticator:
    """The inference API's door: keys, failed attempts and per-key limits together."""

    def __init__(self, keys: KeyCheck, limits: KeyLimits, failures: FailedAttempts) -> None:
        self.keys = keys
        self.limits = limits
        self.failures = failures

    def guard(self, handler: Handler) -> Handler:
        """``handler`` behind the keys (unchanged when there are none)."""
        if not self.keys:
            return handler

        async def guarded(request: Request, conn: Connection) -> Reply:
            address = peer_address(conn)
            self.failures.check(address)
            key = self.keys.match(request.headers)
            if key is None:
                self.failures.failed(address)
                raise unauthorized(
                    "missing or invalid API key: send Authorization: Bearer <key> (keys come "
                    f"from {ENV_API_KEY} or --api-key-file)"
                )
            if self.limits.active:
                self.limits.admit(key)
            token = _current_key.set(key)
            try:
                return await handler(request, conn)
            finally:
                _current_key.reset(token)

        return guarded

    def charge(self, tokens: int) -> None:
        """Count a finished request's tokens against the key it came with, if any."""
        key = _current_key.get()
        if key is not None and self.limits.active:
            self.limits.charge(key, tokens)


def peer_address(conn: Connection) -> str:
    """The client's address (host only; "local" for a Unix socket)."""
    transport = conn.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return "local"
