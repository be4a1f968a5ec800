"""The admin API: list, add, remove and drain workers at run time.

Every route needs ``Authorization: Bearer <admin key>`` (``--admin-key-file``,
``PDSERVE_ADMIN_KEY`` or ``--admin-key``); a wrong or missing key is a 401
(``invalid_api_key``), compared in constant time, and an address that fails too often in a
minute gets 429s (``router.app.auth``). A router started without ``--admin-key`` has no admin API: every
route answers 403 (``admin_disabled``). Errors use OpenAI's error-body shape.

| route | does |
| --- | --- |
| ``GET /admin/workers`` | ``{"workers": [...]}``: endpoint, role, source, health, circuit, in-flight, draining, last load |
| ``POST /admin/workers`` ``{"url", "role"}`` | GetInfo, the pool's compatibility checks, then add: 201 with the worker |
| ``DELETE /admin/workers/{endpoint}`` | remove now (requests in flight finish) |
| ``POST /admin/workers/{endpoint}/drain`` | no new requests; leaves when its last request ends |

Under ``--processes N`` a change reaches every router process before the reply; the list is
the answering process's view (its own in-flight counts).
"""  # noqa: E501

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from protos.contract import ROLES
from router.app.auth import FailedAttempts, KeyCheck, peer_address
from router.app.errors import RequestError, invalid
from router.app.http import Connection
from router.app.routes import Request, Response, Routes
from router.fleet.compat import WorkerRefused, WorkerUnreachable
from router.fleet.pool import WorkerPool
from router.fleet.worker import SOURCE_ADMIN, endpoint_of

Handler = Callable[[Request, Connection], Awaitable[Response]]

ADD_TIMEOUT_S = 5.0  # how long POST /admin/workers waits for the worker's GetInfo
FORWARDED = "X-Pdserve-Forwarded"  # a change another router process already made

log = logging.getLogger(__name__)


class AdminApi:
    """``peers``: the control sockets of the other processes of ``--processes N``; a change
    made here is made there too before the reply (a forwarded one is not forwarded again)."""

    def __init__(
        self,
        pool: WorkerPool,
        key: str | None,
        peers: Sequence[str] = (),
        journal: Path | None = None,
        failures: FailedAttempts | None = None,
    ) -> None:
        self.pool = pool
        self.key = key
        self._key_check = KeyCheck([] if key is None else [key])
        self.failures = failures or FailedAttempts(10)
        self.peers = tuple(peers)
        # --processes N: every change, in order, so that a process started again (after a
        # crash) replays them and agrees with the others.
        self.journal = journal

    def add_routes(self, routes: Routes) -> None:
        routes.add("GET", "/admin/workers", self._guard(self.list_workers))
        routes.add("POST", "/admin/workers", self._guard(self.add_worker))
        routes.add("DELETE", "/admin/workers/{endpoint}", self._guard(self.remove_worker))
        routes.add("POST", "/admin/workers/{endpoint}/drain", self._guard(self.drain_worker))

    def _guard(self, handler: Handler) -> Handler:
        async def guarded(request: Request, conn: Connection) -> Response:
            if self.key is None:
                raise RequestError(
                    403, "the admin API is disabled; start the router with --admin-key",
                    None, "admin_disabled",
                )  # fmt: skip
            address = peer_address(conn)
            self.failures.check(address)
            if self._key_check.match(request.headers) is None:
                self.failures.failed(address)
                raise RequestError(
                    401, "invalid admin key: send Authorization: Bearer <--admin-key>",
                    None, "invalid_api_key",
                )  # fmt: skip
            response = await handler(request, conn)
            if request.method != "GET" and response.status < 300:
                await self._forward(request)
            return response

        return guarded

    async def _forward(self, request: Request) -> None:
        if request.headers.get(FORWARDED.lower()):
            return
        body = request.body
        if self.journal is not None:
            # latin-1 maps each byte to one character and back: any body round-trips.
            entry = {
                "method": request.method,
                "path": request.target,
                "body": body.decode("latin-1"),
            }
            with self.journal.open("ab") as f:
                f.write(orjson.dumps(entry) + b"\n")
        await asyncio.gather(
            *(self._send(p, request.method, request.target, body) for p in self.peers)
        )

    async def replay(self, control_socket: str) -> None:
        """Apply the journal's changes to this process, through its control socket."""
        if self.journal is None or not self.journal.exists():
            return
        for line in self.journal.read_bytes().splitlines():
            entry = orjson.loads(line)
            body = entry["body"].encode("latin-1")
            await self._send(control_socket, entry["method"], entry["path"], body)

    async def _send(self, socket_path: str, method: str, path: str, body: bytes) -> None:
        """One change to the router process at ``socket_path``; failures are logged."""
        headers = {
            "Authorization": f"Bearer {self.key}",
            "Content-Type": "application/json",
            FORWARDED: "1",
        }
        timeout = aiohttp.ClientTimeout(total=ADD_TIMEOUT_S + 5)
        try:
            connector = aiohttp.UnixConnector(path=socket_path)
            async with (
                aiohttp.ClientSession(connector=connector, timeout=timeout) as http,
                http.request(method, f"http://router{path}", data=body, headers=headers) as resp,
            ):
                # 404/409: the change is there already (the registry, a race): fine.
                if resp.status >= 300 and resp.status not in (404, 409):
                    log.warning(
                        "admin %s %s: router process at %s answered %d: %s",
                        method, path, socket_path, resp.status, await resp.text(),
                    )  # fmt: skip
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.warning(
                "admin %s %s not applied in the router process at %s: %r",
                method, path, socket_path, exc,
            )  # fmt: skip

    async def list_workers(self, request: Request, conn: Connection) -> Response:
        return _json({"workers": [w.describe() for w in self.pool.all_workers]})

    async def add_worker(self, request: Request, conn: Connection) -> Response:
        try:
            body = orjson.loads(request.body)
        except orjson.JSONDecodeError as exc:
            raise invalid(f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise invalid("request body must be a JSON object")
        url, role = body.get("url"), body.get("role")
        if not isinstance(url, str):
            raise invalid(f"'url' must be a string (host:port), got {url!r}", "url")
        if role not in ROLES:
            raise invalid(f"'role' must be one of {list(ROLES)}, got {role!r}", "role")
        try:
            endpoint = endpoint_of(url)
        except ValueError as exc:
            raise invalid(str(exc), "url") from None
        if self.pool.get(endpoint) is not None:
            raise RequestError(409, f"worker {endpoint} is already in the pool", "url", "conflict")
        self.pool.evicted.discard(endpoint)
        try:
            worker = await self.pool.admit(url, role, SOURCE_ADMIN, ADD_TIMEOUT_S)
        except WorkerUnreachable as exc:
            raise RequestError(502, str(exc), "url", "worker_unreachable") from None
        except WorkerRefused as exc:
            raise invalid(str(exc), "url", "worker_incompatible") from None
        except ValueError as exc:
            raise RequestError(409, str(exc), "url", "conflict") from None
        return _json(worker.describe(), status=201)

    async def remove_worker(self, request: Request, conn: Connection) -> Response:
        endpoint = self._endpoint(request)
        worker = self.pool.remove(endpoint, "removed by the admin API")
        if worker is None:
            raise _not_found(endpoint)
        self.pool.evicted.add(endpoint)
        return _json({"removed": worker.describe()})

    async def drain_worker(self, request: Request, conn: Connection) -> Response:
        endpoint = self._endpoint(request)
        worker = self.pool.drain(endpoint)
        if worker is None:
            raise _not_found(endpoint)
        self.pool.evicted.add(endpoint)
        return _json(worker.describe())

    def _endpoint(self, request: Request) -> str:
        raw = urllib.parse.unquote(request.params["endpoint"])
        try:
            return endpoint_of(raw)
        except ValueError as exc:
            raise invalid(str(exc), "endpoint") from None


def _not_found(endpoint: str) -> RequestError:
    return RequestError(404, f"no worker {endpoint} in the pool", "endpoint", "worker_not_found")


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status)
