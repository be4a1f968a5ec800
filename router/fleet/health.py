"""The health-check and circuit-breaker settings (``HealthConfig``), and how the router's
channels and sessions reach the workers (keepalive, transport, cluster token, TLS).

The checks run in ``router.fleet.monitor``; the breaker is ``router.fleet.breaker``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from protos import cluster_tls, cluster_token

TRANSPORTS = ("native", "grpcio")


@dataclass(frozen=True)
class HealthConfig:
    """Health checks and circuit breaking; validated at construction."""

    check_interval_s: float = 2.0  # --health-check-interval
    check_timeout_s: float = 1.0  # --health-check-timeout
    failure_threshold: int = 3  # --cb-failure-threshold: consecutive failures that open
    open_timeout_s: float = 10.0  # --cb-open-timeout: open this long, then half-open
    success_threshold: int = 2  # --cb-success-threshold: successes that close a half-open one
    # --worker-keepalive: ping each worker's connection this often; one unanswered this long
    # closes it, failing its requests over (a worker that hangs keeps its sockets open).
    keepalive_s: float = 10.0
    # --worker-transport: how request sessions reach workers. "native": the router's own
    # gRPC client on the event loop (router.client.grpc_stream); "grpcio": grpc.aio.
    session_transport: str = "native"
    # Sent on every call to the workers (protos.cluster_token); None: none. Never printed.
    cluster_token: str | None = field(default=None, repr=False)
    # Mutual TLS to the workers (protos.cluster_tls, --tls-dir); None: plain TCP.
    cluster_tls: cluster_tls.ClusterTls | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.session_transport not in TRANSPORTS:
            raise ValueError(
                f"--worker-transport must be one of {list(TRANSPORTS)}, "
                f"got {self.session_transport!r}"
            )
        for flag, value in (
            ("--health-check-interval", self.check_interval_s),
            ("--health-check-timeout", self.check_timeout_s),
            ("--cb-open-timeout", self.open_timeout_s),
            ("--worker-keepalive", self.keepalive_s),
        ):
            if not value > 0:
                raise ValueError(f"{flag} must be > 0, got {value}")
        for flag, count in (
            ("--cb-failure-threshold", self.failure_threshold),
            ("--cb-success-threshold", self.success_threshold),
        ):
            if count < 1:
                raise ValueError(f"{flag} must be >= 1, got {count}")

    @staticmethod
    def add_args(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("health and circuit breaking")
        g.add_argument("--health-check-interval", type=float, default=2.0, help="seconds")
        g.add_argument("--health-check-timeout", type=float, default=1.0, help="seconds")
        g.add_argument(
            "--cb-failure-threshold",
            type=int,
            default=3,
            help="consecutive failures (health checks or requests) that open a worker's circuit",
        )
        g.add_argument(
            "--cb-open-timeout", type=float, default=10.0, help="seconds open before half-open"
        )
        g.add_argument(
            "--cb-success-threshold",
            type=int,
            default=2,
            help="successes that close a half-open circuit",
        )
        g.add_argument(
            "--worker-keepalive",
            type=float,
            default=10.0,
            help="seconds between pings on each worker connection; a ping unanswered as long "
            "drops the connection and fails its requests over to other workers",
        )
        g.add_argument(
            "--worker-transport",
            choices=TRANSPORTS,
            default="native",
            help="request sessions to workers: the router's own gRPC client on its event loop "
            "(native), or grpc.aio (grpcio); health checks and the other calls use grpcio",
        )
        g.add_argument(
            "--cluster-token-file",
            help=f"file whose first line is the token every call to the workers carries (or "
            f"{cluster_token.ENV}); workers given the same refuse calls without it",
        )
        g.add_argument(
            "--tls-dir",
            help=f"directory with ca.crt, tls.crt and tls.key (or {cluster_tls.ENV}): talk to "
            "the workers over mutual TLS (`make certs` writes a local CA's; workers need the "
            "same CA)",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> HealthConfig:
        return cls(
            check_interval_s=args.health_check_interval,
            check_timeout_s=args.health_check_timeout,
            failure_threshold=args.cb_failure_threshold,
            open_timeout_s=args.cb_open_timeout,
            success_threshold=args.cb_success_threshold,
            keepalive_s=args.worker_keepalive,
            session_transport=args.worker_transport,
            cluster_token=cluster_token.load(args.cluster_token_file),
            cluster_tls=cluster_tls.ClusterTls.load(args.tls_dir),
        )

    @property
    def channel_options(self) -> list[tuple[str, int]]:
        """gRPC client options of a worker's channel (keepalive)."""
        ms = int(self.keepalive_s * 1000)
        return [
            ("grpc.keepalive_time_ms", ms),
            ("grpc.keepalive_timeout_ms", ms),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            # Recent gRPC cores time a keepalive ping out by this one, 60 s unless set.
            ("grpc.http2.ping_timeout_ms", ms),
            # A frame of a busy session (logprobs of many requests) may pass gRPC's 4 MiB.
            ("grpc.max_receive_message_length", -1),
        ]
