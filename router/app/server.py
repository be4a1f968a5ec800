"""The router put together: ``Router`` (the model, tokenizer, workers, metrics, auth and
admission every handler needs) and ``RouterServer`` (the routes on the HTTP server, errors as
OpenAI bodies, request accounting); ``serve`` starts both. The endpoints themselves are in
``router.app.handlers``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus

import orjson

from engine.tokenizer import Tokenizer
from router import processes
from router.app.admin import AdminApi
from router.app.admission import Admission, Overloaded
from router.app.auth import Authenticator, FailedAttempts, KeyCheck, KeyLimits
from router.app.busy_poll import BusyPoll
from router.app.errors import RequestError, from_worker
from router.app.handlers import Handlers
from router.app.http import Connection, HttpServer
from router.app.prompts import PromptBuilder
from router.app.routes import NoRoute, Reply, Request, Response, Routes
from router.client.errors import NoUsableWorker, WorkerError
from router.config import RouterConfig
from router.fleet.compat import ModelInfo
from router.fleet.policies import make_policy
from router.fleet.pool import WorkerPool
from router.fleet.registry import RegistryWatcher
from router.fleet.worker import load_of
from router.metrics import RequestTally, RouterMetrics

log = logging.getLogger(__name__)


@dataclass
class Router:
    """What every handler needs: the model, its tokenizer, the workers, the metrics."""

    config: RouterConfig
    tokenizer: Tokenizer
    model: ModelInfo
    pool: WorkerPool
    metrics: RouterMetrics
    created: int
    admission: Admission
    registry: RegistryWatcher | None = None

    @classmethod
    async def start(cls, config: RouterConfig) -> Router:
        """Load the tokenizer, discover the static workers, read the registry, and start the
        health checks (RuntimeError if the workers cannot serve)."""
        tokenizer = Tokenizer.from_pretrained(config.model_path)
        metrics = RouterMetrics()
        pool = WorkerPool(
            config.workers,
            config.prefill,
            config.decode,
            prefill_policy=make_policy(config.prefill_policy_spec, load_of),
            decode_policy=make_policy(config.decode_policy_spec, load_of),
            health=config.health,
            retry=config.retry,
            metrics=metrics,
            eos_token_ids=tokenizer.eos_token_ids,
        )
        registry = None
        try:
            model = await pool.discover(config.startup_timeout_s, config.served_model_name)
            if config.registry.url is not None:
                registry = RegistryWatcher(config.registry, pool)
                if model is None:
                    model = await _first_registered(registry, config)
                else:
                    await registry.poll(wait_admits=True)  # unreachable: logged, not fatal
                registry.start()
            if model is None:
                raise RuntimeError("no workers: give --worker, --prefill/--decode or --registry")
        except BaseException:
            if registry is not None:
                await registry.close()
            await pool.close()
            raise
        metrics.set_model(model.name)
        pool.start_health_checks()
        admission = Admission(
            processes.child_admission(config.admission, config.processes), metrics
        )
        return cls(config, tokenizer, model, pool, metrics, int(time.time()), admission, registry)

    async def close(self) -> None:
        await self.tally.close()
        if self.registry is not None:
            await self.registry.close()
        await self.pool.close()

    @functools.cached_property
    def tally(self) -> RequestTally:
        return RequestTally(self.metrics)

    @functools.cached_property
    def failed_auth(self) -> FailedAttempts:
        return FailedAttempts(self.config.auth_failures_per_minute)

    @functools.cached_property
    def auth(self) -> Authenticator:
        c = self.config
        share = max(1, c.processes)  # --processes N: each enforces 1/N of the limits
        limits = KeyLimits(c.rate_limit_rps / share, c.rate_limit_tpm / share)
        return Authenticator(KeyCheck(c.api_keys), limits, self.failed_auth)

    @functools.cached_property
    def admin(self) -> AdminApi:
        c = self.config
        return AdminApi(
            self.pool,
            c.admin_key,
            processes.peers(c),
            processes.journal(c),
            failures=self.failed_auth,
        )

    @functools.cached_property
    def builder(self) -> PromptBuilder:
        return PromptBuilder(self.tokenizer, self.model)


class RouterServer:
    """The router's HTTP server and what it serves: ``close`` stops both."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.routes = Routes()
        handlers = Handlers(router)
        for path, handler in (
            ("/v1/completions", handlers.completions),
            ("/v1/chat/completions", handlers.chat),
            ("/generate", handlers.generate),
        ):
            # Keys before a slot: an unauthenticated flood takes no concurrency slots.
            self.routes.add("POST", path, router.auth.guard(_admitted(router.admission, handler)))
        for path, handler in (
            ("/tokenize", handlers.tokenize),
            ("/detokenize", handlers.detokenize),
        ):
            self.routes.add("POST", path, router.auth.guard(handler))
        self.routes.add("GET", "/v1/models", router.auth.guard(handlers.models))
        for path in ("/v1/models/{id}", "/v1/models/{org}/{id}"):
            self.routes.add("GET", path, router.auth.guard(handlers.model))
        self.routes.add("GET", "/health", handlers.health)
        self.routes.add("GET", "/metrics", handlers.metrics)
        router.admin.add_routes(self.routes)
        us = router.config.busy_poll_us
        self.busy_poll = BusyPoll(us) if us else None
        self.http = HttpServer(
            self.dispatch,
            self.error_reply,
            router.config.max_body_bytes,
            on_traffic=None if self.busy_poll is None else self.busy_poll.kick,
        )
        self.tally = router.tally
        self.tally.start()

    async def dispatch(self, request: Request, conn: Connection) -> Reply:
        """Route one request; errors become OpenAI error bodies, and every answer is
        counted by route and status."""
        try:
            route, handler = self.routes.resolve(request)
        except NoRoute as exc:
            message = f"{HTTPStatus(exc.status).phrase}: {request.method} {request.path}"
            reply = _error_response(RequestError(exc.status, message))
            if exc.allowed:
                reply.headers = {"Allow": ", ".join(exc.allowed)}
            self.tally.answered("other", exc.status)
            return reply
        self.tally.begin()
        status = 500
        try:
            reply = await handler(request, conn)
            status = reply.status if reply.outcome is None else reply.outcome
            return reply
        except (RequestError, WorkerError, NoUsableWorker) as caught:
            error = caught if isinstance(caught, RequestError) else from_worker(caught)
            status = error.status
            reply = _error_response(error)
            if isinstance(error, Overloaded):
                reply.headers = {"Retry-After": str(error.retry_after_s)}
            return reply
        except asyncio.CancelledError:
            status = 499  # the client went away
            raise
        except Exception:
            log.exception("unhandled error in %s %s", request.method, request.path)
            return _error_response(RequestError(500, "internal router error; see the router log"))
        finally:
            self.tally.end(route, status)

    def error_reply(self, status: int, message: str) -> Response:
        """What the HTTP layer answers a request it cannot parse (400) or take (413)."""
        self.tally.answered("other", status)
        return _error_response(RequestError(status, message))

    async def close(self) -> None:
        await self.http.close()
        if self.busy_poll is not None:
            self.busy_poll.close()
        await self.router.close()


_Handler = Callable[[Request, Connection], Awaitable[Reply]]


def _admitted(admission: Admission, handler: _Handler) -> _Handler:
    """Run a generation handler inside a slot of ``--max-concurrent-requests`` (429 when the
    queue is full or the wait too long); the slot is held until the response is written."""

    async def admitted(request: Request, conn: Connection) -> Reply:
        # acquire/release rather than ``async with admission.slot()``: a generator-based
        # context manager cost this hot path about 4 µs per request (stub bench).
        await admission.acquire()
        try:
            return await handler(request, conn)
        finally:
            admission.release()

    return admitted


async def _first_registered(registry: RegistryWatcher, config: RouterConfig) -> ModelInfo:
    """Poll the registry until a worker joins (RuntimeError after ``--startup-timeout``)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + config.startup_timeout_s
    while True:
        await registry.poll(wait_admits=True)
        if registry.pool.all_workers:
            return registry.pool.set_model(config.served_model_name)
        if loop.time() >= deadline:
            raise RuntimeError(
                f"no usable worker registered in {config.registry.url} under prefix "
                f"{config.registry.prefix!r} within {config.startup_timeout_s:g}s"
            )
        await asyncio.sleep(min(config.registry.poll_interval_s, 0.2))


async def serve(config: RouterConfig) -> tuple[RouterServer, str]:
    """Start the router on ``config.host:config.port``; returns the server and its URL."""
    router = await Router.start(config)
    server = RouterServer(router)
    child = config.process_index is not None
    try:
        # A child of --processes N shares the port with its siblings, and takes forwarded
        # admin changes on its control socket.
        port = await server.http.listen_tcp(config.host, config.port, reuse_port=child)
        if child:
            assert config.control_dir is not None and config.process_index is not None
            path = processes.control_socket(config.control_dir, config.process_index)
            await server.http.listen_unix(path)
            await router.admin.replay(path)  # the admin changes made before this one started
    except BaseException:
        await server.close()
        raise
    return server, f"http://{config.host}:{port}"


# ---- errors ----------------------------------------------------------------------------------


def _error_response(exc: RequestError) -> Response:
    return Response(orjson.dumps(exc.body()), exc.status)
