"""The worker's command line, and what it sets up from it before the engine starts. Both
roles' entry points and the ranks of an expert-parallel instance parse it."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from engine.cli import add_engine_args, engine_config_from_args
from engine.config import EngineConfig
from kv_transfer import TRANSFER_BACKENDS
from protos import cluster_tls, cluster_token
from protos.cli_help import DefaultsHelpFormatter
from protos.contract import ROLE_DECODE, ROLES
from worker.registry import DEFAULT_PREFIX

GRAMMAR_WARMUP_ENV = "PDSERVE_GRAMMAR_WARMUP"


def worker_engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine's settings for a worker of ``args.disaggregation_mode``: a decode worker of a
    disaggregated pair prefills only to recompute preempted requests (no prefill graphs by
    default)."""
    return engine_config_from_args(
        args, recompute_only_prefills=args.disaggregation_mode == ROLE_DECODE
    )


def build_parser(modes: Sequence[str] = ROLES) -> argparse.ArgumentParser:
    """The worker's flags: the engine's and the worker's. ``modes``: the
    ``--disaggregation-mode`` values the entry point serves, its default first."""
    parser = argparse.ArgumentParser(
        description=f"pdserve worker (default role {modes[0]})",
        formatter_class=DefaultsHelpFormatter,
    )
    add_engine_args(parser)
    g = parser.add_argument_group("worker")
    g.add_argument("--host", default="127.0.0.1", help="address to bind and advertise")
    g.add_argument(
        "--grammar-warmup",
        action=argparse.BooleanOptionalAction,
        default=os.environ.get(GRAMMAR_WARMUP_ENV, "1") != "0",
        help="build constrained decoding's vocabulary view in the background at start, so "
        f"that the first JSON-schema request does not wait for it ({GRAMMAR_WARMUP_ENV}=0: off)",
    )
    g.add_argument("--port", type=int, default=0, help="gRPC port (0: pick a free one)")
    g.add_argument(
        "--session-port", type=int, default=0,
        help="port of the session listener, which serves routers' session streams without "
        "grpc.aio (0: pick a free one; -1: none, sessions on --port only)",
    )  # fmt: skip
    g.add_argument("--disaggregation-mode", default=modes[0], choices=tuple(modes))
    g.add_argument("--served-model-name", help="model name clients use (default: dir name)")
    g.add_argument("--transfer-backend", default="mooncake", choices=TRANSFER_BACKENDS)
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
    g.add_argument(
        "--tls-dir",
        help=f"directory with ca.crt, tls.crt and tls.key (or {cluster_tls.ENV}): serve and call "
        "peers over mutual TLS; callers need a certificate of the same CA (`make certs`)",
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


def model_name(args: argparse.Namespace, config: EngineConfig) -> str:
    """The model name clients use: ``--served-model-name``, else the model directory's name."""
    return str(args.served_model_name or Path(config.model_path).name)


def configure_mooncake(transfer_timeout_s: float) -> None:
    """Mooncake reads these once, when the first engine starts."""
    os.environ.setdefault("MC_LOG_LEVEL", "WARNING")
    # A write to a peer that stopped answering must fail before the decode side gives up on
    # the transfer and reuses its pages.
    os.environ.setdefault("MC_TCP_PROGRESS_TIMEOUT_SEC", str(max(1, int(transfer_timeout_s / 2))))
