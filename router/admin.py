"""The admin API: list, add, remove and drain workers at run time.

Every route needs ``Authorization: Bearer <--admin-key>``; a wrong or missing key is a 401
(``invalid_api_key``). A router started without ``--admin-key`` has no admin API: every
route answers 403 (``admin_disabled``). Errors use OpenAI's error-body shape.

| route | does |
| --- | --- |
| ``GET /admin/workers`` | ``{"workers": [...]}``: endpoint, role, source, health, circuit, in-flight, draining, last load |
| ``POST /admin/workers`` ``{"url", "role"}`` | GetInfo, the pool's compatibility checks, then add: 201 with the worker |
| ``DELETE /admin/workers/{endpoint}`` | remove now (requests in flight finish) |
| ``POST /admin/workers/{endpoint}/drain`` | no new requests; leaves when its last request ends |
"""  # noqa: E501

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from router.errors import RequestError, invalid
from router.workers import (
    ROLES,
    SOURCE_ADMIN,
    WorkerPool,
    WorkerRefused,
    WorkerUnreachable,
    endpoint_of,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ADD_TIMEOUT_S = 5.0  # how long POST /admin/workers waits for the worker's GetInfo


class AdminApi:
    def __init__(self, pool: WorkerPool, key: str | None) -> None:
        self.pool = pool
        self.key = key

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/admin/workers", self._guard(self.list_workers))
        app.router.add_post("/admin/workers", self._guard(self.add_worker))
        app.router.add_delete("/admin/workers/{endpoint}", self._guard(self.remove_worker))
        app.router.add_post("/admin/workers/{endpoint}/drain", self._guard(self.drain_worker))

    def _guard(self, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            if self.key is None:
                raise RequestError(
                    403, "the admin API is disabled; start the router with --admin-key",
                    None, "admin_disabled",
                )  # fmt: skip
            given = request.headers.get("Authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), self.key.encode()
            ):
                raise RequestError(
                    401, "invalid admin key: send Authorization: Bearer <--admin-key>",
                    None, "invalid_api_key",
                )  # fmt: skip
            return await handler(request)

        return guarded

    async def list_workers(self, request: web.Request) -> web.Response:
        return _json({"workers": [w.describe() for w in self.pool.all_workers]})

    async def add_worker(self, request: web.Request) -> web.Response:
        try:
            body = orjson.loads(await request.read())
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

    async def remove_worker(self, request: web.Request) -> web.Response:
        endpoint = self._endpoint(request)
        worker = self.pool.remove(endpoint, "removed by the admin API")
        if worker is None:
            raise _not_found(endpoint)
        self.pool.evicted.add(endpoint)
        return _json({"removed": worker.describe()})

    async def drain_worker(self, request: web.Request) -> web.Response:
        endpoint = self._endpoint(request)
        worker = self.pool.drain(endpoint)
        if worker is None:
            raise _not_found(endpoint)
        self.pool.evicted.add(endpoint)
        return _json(worker.describe())

    def _endpoint(self, request: web.Request) -> str:
        raw = request.match_info["endpoint"]
        try:
            return endpoint_of(raw)
        except ValueError as exc:
            raise invalid(str(exc), "endpoint") from None


def _not_found(endpoint: str) -> RequestError:
    return RequestError(404, f"no worker {endpoint} in the pool", "endpoint", "worker_not_found")


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type="application/json")
