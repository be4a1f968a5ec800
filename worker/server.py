"""Starts a worker process: engine, KV pool registered with the transfer engine, gRPC server
with the standard health service. Both `python -m decode_worker` and `python -m prefill_worker`
come here; `--disaggregation-mode` picks the role.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from decode_worker.ranks import free_port, join_instance, start_children
from decode_worker.servicer import DecodeServicer
from engine.async_engine import AsyncEngine
from engine.cli import add_engine_args, engine_config_from_args
from engine.device import resolve_device
from engine.engine import Engine
from engine.parallel import ParallelConfig, init_process_group
from kv_transfer import (
    TransferEngine,
    create_transfer_engine,
)
from kv_transfer import faults as transfer_faults
from prefill_worker.servicer import PrefillServicer
from protos import cluster_token
from protos.contract import ROLES
from worker import session
from worker.convert import engine_layout
from worker.metrics import WorkerMetrics
from worker.registry import DEFAULT_PREFIX, RedisRegistration, WorkerRecord
from worker.runtime import WorkerRuntime, WorkerSettings
from worker.service import add_service
from worker.session_server import SessionServer

log = logging.getLogger(__name__)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every option's default, options written without help text too."""

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and action.option_strings and _shown(action.default):
            action.help = "(default: %(default)s)"  # argparse lists only actions with help
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "%(default)" in text or not _shown(action.default):
            return text
        return f"{text} (default: %(default)s)"


def _shown(default: object) -> bool:
    return default not in (None, False, argparse.SUPPRESS, [], ())


def build_parser(default_role: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=f"pdserve worker (default role {default_role})",
        formatter_class=DefaultsHelpFormatter,
    )
    add_engine_args(parser)
    g = parser.add_argument_group("worker")
    g.add_argument("--host", default="127.0.0.1", help="address to bind and advertise")
    g.add_argument("--port", type=int, default=0, help="gRPC port (0: pick a free one)")
    g.add_argument(
        "--session-port", type=int, default=0,
        help="port of the session listener, which serves routers' session streams without "
        "grpc.aio (0: pick a free one; -1: none, sessions on --port only)",
    )  # fmt: skip
    g.add_argument("--disaggregation-mode", default=default_role, choices=ROLES)
    g.add_argument("--served-model-name", help="model name clients use (default: dir name)")
    g.add_argument("--transfer-backend", default="mooncake")
    g.add_argument("--transfer-timeout", type=float, default=30.0, help="seconds")
    g.add_argument(
        "--kv-quarantine-timeout", type=float, default=300.0,
        help="seconds the pages of a transfer given up on stay out of use while the prefill "
        "worker cannot be reached to confirm that it writes them no more",
    )  # fmt: skip
    g.add_argument(
        "--cluster-token-file",
        help=f"file whose first line is the token calls to and from this worker carry (or "
        f"{cluster_token.ENV}); calls without it are refused, health checks excepted",
    )
    g.add_argument("--registry", help="register in this Redis (redis://host:port/db)")
    g.add_argument("--registry-prefix", default=DEFAULT_PREFIX)
    g.add_argument("--registry-ttl", type=float, default=10.0, help="seconds")
    g.add_argument(
        "--drain-timeout", type=float, default=60.0,
        help="on SIGTERM, seconds to let in-flight requests finish",
    )  # fmt: skip
    g.add_argument(
        "--dist-init-addr",
        help="host:port where the instance's ranks meet; given when a launcher starts ranks "
        "1..N-1 itself (python -m decode_worker.ranks), otherwise rank 0 starts them",
    )
    g.add_argument("--metrics-port", type=int, default=0, help="/metrics port (0: pick one)")
    g.add_argument(
        "--expert-metrics-interval", type=float, default=10.0,
        help="seconds between expert-load readings (expert parallelism only; 0: never)",
    )  # fmt: skip
    g.add_argument(
        "--enable-eplb", action="store_true",
        help="rebalance experts at every expert-load reading",
    )  # fmt: skip
    return parser


async def drain(engine: AsyncEngine, timeout_s: float) -> None:
    """Wait until no request is in flight on any rank (or the timeout passes)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while engine.alive and loop.time() < deadline:
        busy = engine.has_streams() or any(
            x.num_running or x.num_waiting or x.num_transferring for x in engine.loads
        )
        if not busy:
            return
        await asyncio.sleep(0.1)


def configure_mooncake(transfer_timeout_s: float) -> None:
    """Mooncake reads these once, when the first engine starts."""
    os.environ.setdefault("MC_LOG_LEVEL", "WARNING")
    # A write to a peer that stopped answering must fail before the decode side gives up on
    # the transfer and reuses its pages.
    os.environ.setdefault("MC_TCP_PROGRESS_TIMEOUT_SEC", str(max(1, int(transfer_timeout_s / 2))))


async def serve(args: argparse.Namespace, argv: list[str]) -> None:
    role = args.disaggregation_mode
    config = engine_config_from_args(args)
    model_name = args.served_model_name or Path(config.model_path).name
    children = []
    if config.ep_size > 1:
        if role == "prefill":
            raise SystemExit("expert parallelism on the prefill side is not supported yet")
        if args.dist_init_addr:
            master = args.dist_init_addr  # ranks 1..N-1 are started by the launcher (Ray)
        else:
            master = f"{args.host}:{free_port(args.host)}"
            children = start_children(argv, config.ep_size, master)
        parallel = ParallelConfig(config.ep_size, 0, config.ep_num_redundant_experts)
        init_process_group(parallel, resolve_device(config.device), master)
    engine = Engine(config)
    transfer: TransferEngine | None = None
    if role != "null":
        configure_mooncake(args.transfer_timeout)
        transfer = create_transfer_engine(args.transfer_backend, hostname=args.host)
        faults = os.environ.get(transfer_faults.ENV)
        if faults:
            log.warning("%s=%s: KV writes are delayed and dropped on purpose (chaos testing)",
                        transfer_faults.ENV, faults)  # fmt: skip
            transfer = transfer_faults.FaultyTransferEngine(
                transfer, transfer_faults.TransferFaults.parse(faults)
            )
    ranks = join_instance(engine, transfer, model_name) or []

    token = cluster_token.load(args.cluster_token_file)
    server = grpc.aio.server(
        options=session.SERVER_OPTIONS, interceptors=cluster_token.server_interceptors(token)
    )
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    sessions = SessionServer(token)
    session_port = 0 if args.session_port < 0 else await sessions.bind(args.host, args.session_port)
    settings = WorkerSettings(
        role=role,
        model_name=model_name,
        endpoint=f"{args.host}:{port}",
        session_port=session_port,
        transfer_timeout_s=args.transfer_timeout,
        kv_quarantine_timeout_s=args.kv_quarantine_timeout,
        cluster_token=token,
    )
    async_engine = AsyncEngine(engine)
    metrics = WorkerMetrics(role, settings.endpoint, model_name)
    metrics_port = metrics.serve(args.host, args.metrics_port)
    runtime = WorkerRuntime(
        settings,
        async_engine,
        engine_layout(engine, model_name),
        transfer,
        [r.pool for r in ranks],
        [r.session_id for r in ranks],
        metrics,
    )
    servicer = PrefillServicer(runtime) if role == "prefill" else DecodeServicer(runtime)
    served = [add_service(servicer, server, sessions)]
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
            model=model_name,
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
                "model": model_name,
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
    await drain(async_engine, args.drain_timeout)
    await asyncio.gather(server.stop(grace=5.0), sessions.stop(grace_s=5.0))
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


def main(default_role: str, argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(default_role).parse_args(argv)
    asyncio.run(serve(args, argv))
    return 0
