"""Starts a worker process: engine, KV pool registered with the transfer engine, gRPC server
with the standard health service. Both `python -m decode_worker` and `python -m prefill_worker`
come here, each with its ``WorkerRole`` (its servicer); `--disaggregation-mode` picks among
the modes that role serves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.device import resolve_device
from engine.engine import START_ERRORS, Engine
from engine.grammar import GrammarBackend
from engine.parallel import ParallelConfig, init_process_group
from kv_transfer import (
    TransferEngine,
    create_transfer_engine,
)
from kv_transfer import faults as transfer_faults
from protos import cluster_tls, cluster_token
from protos.contract import ROLE_COLOCATED
from worker import session
from worker.args import build_parser, configure_mooncake, model_name, worker_engine_config
from worker.convert import engine_layout
from worker.metrics import WorkerMetrics
from worker.ranks import free_port, join_instance, start_children
from worker.registry import RedisRegistration, WorkerRecord
from worker.runtime import WorkerRuntime, WorkerSettings
from worker.service import WorkerService, add_service
from worker.session_server import SessionServer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerRole:
    """What a role package gives the shared start-up."""

    modes: tuple[str, ...]  # the --disaggregation-mode values it serves, its default first
    servicer: Callable[[WorkerRuntime], WorkerService]  # its gRPC service, on the runtime
    # `python -m` this runs ranks 1..N-1 of an expert-parallel instance (worker.ranks.main);
    # None: the role runs one rank only.
    ranks_module: str | None = None


# After the drain, the listeners' calls get this long to end before they are ended UNAVAILABLE:
# the whole grace when requests are still in flight (the drain timed out), a flush's worth when
# none is (what is left open then is idle: a router's session streams and health watches, which
# would otherwise hold every stop for the whole grace).
STOP_GRACE_S = 5.0
IDLE_STOP_GRACE_S = 0.5


async def drain(engine: AsyncEngine, timeout_s: float) -> bool:
    """Wait until no request is in flight on any rank (or the timeout passes, or the engine
    dies); True when none is left."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        busy = engine.has_streams() or any(
            x.num_running or x.num_waiting or x.num_transferring for x in engine.loads
        )
        if not busy:
            return True
        if not engine.alive or loop.time() >= deadline:
            return False
        await asyncio.sleep(0.1)


async def serve(
    worker_role: WorkerRole, args: argparse.Namespace, argv: list[str], config: EngineConfig
) -> None:
    role = args.disaggregation_mode
    model = model_name(args, config)
    children = []
    if config.ep_size > 1:
        if worker_role.ranks_module is None:
            raise SystemExit(f"expert parallelism on the {role} side is not supported yet")
        if args.dist_init_addr:
            master = args.dist_init_addr  # ranks 1..N-1 are started by the launcher (Ray)
        else:
            master = f"{args.host}:{free_port(args.host)}"
            children = start_children(worker_role.ranks_module, argv, config.ep_size, master)
    try:
        if config.ep_size > 1:
            parallel = ParallelConfig(config.ep_size, 0, config.ep_num_redundant_experts)
            init_process_group(parallel, resolve_device(config.device), master)
        engine = Engine(config)
    except START_ERRORS as exc:
        # A device that is not there, a backend for another device, a model path without a
        # model, a model it cannot read, a group it cannot join: one line naming it.
        log.debug("engine start failed", exc_info=True)
        raise SystemExit(f"worker cannot start: {exc}") from None
    if args.grammar_warmup and engine.grammar is not None:
        _warm_grammar(engine.grammar)
    transfer: TransferEngine | None = None
    if role != ROLE_COLOCATED:
        configure_mooncake(args.transfer_timeout)
        try:
            transfer = create_transfer_engine(args.transfer_backend, hostname=args.host)
        except (ValueError, RuntimeError, ImportError, OSError) as exc:
            # Mooncake not installed, its engine refusing the host name: one line.
            log.debug("transfer engine start failed", exc_info=True)
            raise SystemExit(
                f"worker cannot start: the {args.transfer_backend} transfer engine: {exc}"
            ) from None
        faults = os.environ.get(transfer_faults.ENV)
        if faults:
            log.warning("%s=%s: KV writes are delayed and dropped on purpose (chaos testing)",
                        transfer_faults.ENV, faults)  # fmt: skip
            transfer = transfer_faults.FaultyTransferEngine(
                transfer, transfer_faults.TransferFaults.parse(faults)
            )
    ranks = join_instance(engine, transfer, model) or []

    token, tls = args.cluster_token, args.cluster_tls  # read by main()
    server = grpc.aio.server(
        options=session.SERVER_OPTIONS, interceptors=cluster_token.server_interceptors(token)
    )
    address = f"{args.host}:{args.port}"
    sessions = SessionServer(token, tls)
    try:
        if tls is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, tls.server_credentials())
        session_port = (
            0 if args.session_port < 0 else await sessions.bind(args.host, args.session_port)
        )
    except (RuntimeError, OSError) as exc:
        raise SystemExit(
            f"worker cannot start: cannot listen on {args.host} ({exc}); --host must be an "
            f"address of this machine and --port / --session-port free"
        ) from None
    settings = WorkerSettings(
        role=role,
        model_name=model,
        endpoint=f"{args.host}:{port}",
        session_port=session_port,
        transfer_timeout_s=args.transfer_timeout,
        kv_quarantine_timeout_s=args.kv_quarantine_timeout,
        cluster_token=token,
        cluster_tls=tls,
    )
    async_engine = AsyncEngine(engine)
    metrics = WorkerMetrics(role, settings.endpoint, model)
    metrics_port = metrics.serve(args.host, args.metrics_port)
    runtime = WorkerRuntime(
        settings,
        async_engine,
        engine_layout(engine, model),
        transfer,
        [r.pool for r in ranks],
        [r.session_id for r in ranks],
        metrics,
    )
    served = [add_service(worker_role.servicer(runtime), server, sessions)]
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)

    async_engine.start()
    await server.start()
    if session_port:
        await sessions.start()
    for name in ("", *served):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    registration = None
    if args.registry:
        record = WorkerRecord(
            endpoint=settings.endpoint,
            role=role,
            model=model,
            fingerprint=runtime.layout.fingerprint,
            context_length=engine.context_length,
            total_pages=engine.pool.num_pages,
        )
        registration = RedisRegistration(
            args.registry, record, args.registry_ttl, args.registry_prefix
        )
        await registration.start()
    print(
        json.dumps(
            {
                "event": "ready",
                "role": role,
                "endpoint": settings.endpoint,
                "session_port": session_port,
                "model": model,
                "kv_pages": engine.pool.num_pages,
                "metrics": f"http://{args.host}:{metrics_port}/metrics",
                "ep_size": config.ep_size,
            }
        ),
        flush=True,
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def watch_engine() -> None:
        while async_engine.alive:
            await asyncio.sleep(0.5)
        log.error("engine thread died; reporting NOT_SERVING")
        for name in ("", *served):
            await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    watcher = asyncio.create_task(watch_engine())
    reporter = asyncio.create_task(
        metrics.run(async_engine, args.expert_metrics_interval, args.enable_eplb)
    )
    await stop.wait()
    log.info("draining: NOT_SERVING, finishing in-flight requests")
    if registration is not None:
        await registration.set_draining()
    await health.enter_graceful_shutdown()
    started = loop.time()
    idle = await drain(async_engine, args.drain_timeout)
    drained = loop.time()
    grace = IDLE_STOP_GRACE_S if idle else STOP_GRACE_S
    await asyncio.gather(server.stop(grace=grace), sessions.stop(grace_s=grace))
    log.info(
        "drained in %.1f s%s; listeners closed in %.1f s", drained - started,
        "" if idle else " (timed out with requests in flight)", loop.time() - drained,
    )  # fmt: skip
    watcher.cancel()
    reporter.cancel()
    async_engine.stop()
    for child in children:
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
    if registration is not None:
        await registration.stop()
    await runtime.close()


def main(worker_role: WorkerRole, argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(worker_role.modes).parse_args(argv)
    try:  # a misconfiguration is one line with its fix, not a traceback
        args.cluster_token = cluster_token.load(args.cluster_token_file)
        args.cluster_tls = cluster_tls.ClusterTls.load(args.tls_dir)
        config = worker_engine_config(args)  # the engine's flags and PDSERVE_PDL
        check_worker_args(args)  # before the model loads, not minutes after
        check_listen(args.host, args.port)
    except ValueError as exc:
        raise SystemExit(f"worker cannot start: {exc}") from None
    asyncio.run(serve(worker_role, args, argv, config))
    return 0


def check_worker_args(args: argparse.Namespace) -> None:
    """ValueError naming the flag for a worker setting out of its range (ports, timeouts)."""
    for flag, value, low in (
        ("--port", args.port, 0),
        ("--session-port", args.session_port, -1),
        ("--metrics-port", args.metrics_port, 0),
    ):
        if not low <= value <= 65535:
            raise ValueError(f"{flag} must be in [{low}, 65535], got {value}")
    for flag, seconds in (
        ("--transfer-timeout", args.transfer_timeout),
        ("--kv-quarantine-timeout", args.kv_quarantine_timeout),
    ):
        if not seconds > 0:
            raise ValueError(f"{flag} must be a positive number of seconds, got {seconds}")


def check_listen(host: str, port: int) -> None:
    """ValueError naming the fix unless this machine can listen on `host:port` now (an address
    of its own, a free port); the listener itself binds later, after the model loads."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(addr)
    except OSError as exc:
        raise ValueError(
            f"cannot listen on {host}:{port} ({exc}); --host must be an address of this "
            f"machine and --port free"
        ) from None


def _warm_grammar(grammar: GrammarBackend) -> None:
    """Build the vocabulary view in the background; say when it is ready, or why not (then
    constrained requests fail with that reason, the rest serve)."""
    started = time.monotonic()

    def done(future: Future[Any]) -> None:
        exc = future.exception()
        if exc is not None:
            log.warning("constrained decoding unavailable: %s", exc)
        else:
            log.info("constrained decoding ready (%.1f s)", time.monotonic() - started)

    grammar.warm_up().add_done_callback(done)
