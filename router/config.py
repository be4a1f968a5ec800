"""The router's configuration: a frozen dataclass built from command-line flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from router.policy import POLICIES
from router.workers import endpoint_of

DEFAULT_MAX_BODY_BYTES = 8 << 20


@dataclass(frozen=True)
class RouterConfig:
    """Validated at construction: ValueError names the bad flag and value."""

    model_path: str
    workers: tuple[str, ...] = ()  # colocated workers
    prefill: tuple[str, ...] = ()
    decode: tuple[str, ...] = ()
    served_model_name: str | None = None  # default: the name the workers report
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    startup_timeout_s: float = 60.0  # how long discovery waits for the workers
    policy: str = "round_robin"

    def __post_init__(self) -> None:
        if not (Path(self.model_path) / "tokenizer.json").is_file():
            raise ValueError(f"--model-path {self.model_path!r} has no tokenizer.json")
        if bool(self.workers) == bool(self.prefill or self.decode):
            raise ValueError("give either --worker URLs, or --prefill and --decode URLs")
        if (self.prefill or self.decode) and not (self.prefill and self.decode):
            raise ValueError("disaggregated mode needs at least one --prefill and one --decode")
        for url in (*self.workers, *self.prefill, *self.decode):
            endpoint_of(url)  # raises ValueError naming the URL
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port must be in [0, 65535], got {self.port}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"--max-body-bytes must be >= 1024, got {self.max_body_bytes}")
        if self.startup_timeout_s <= 0:
            raise ValueError(f"--startup-timeout must be > 0, got {self.startup_timeout_s}")
        if self.policy not in POLICIES:
            raise ValueError(f"--policy must be one of {sorted(POLICIES)}, got {self.policy!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m router", description="pdserve router: the OpenAI-compatible HTTP front"
    )
    p.add_argument("--model-path", required=True, help="checkpoint dir (tokenizer, template)")
    p.add_argument("--served-model-name", help="model name clients send (default: workers')")
    p.add_argument(
        "--worker",
        action="extend",
        nargs="+",
        default=[],
        metavar="URL",
        help="colocated worker (--disaggregation-mode null), host:port",
    )
    p.add_argument(
        "--prefill",
        action="extend",
        nargs="+",
        default=[],
        metavar="URL",
        help="prefill worker, host:port",
    )
    p.add_argument(
        "--decode",
        action="extend",
        nargs="+",
        default=[],
        metavar="URL",
        help="decode worker, host:port",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0: pick a free port")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    p.add_argument(
        "--startup-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for every worker's GetInfo",
    )
    p.add_argument("--policy", default="round_robin", choices=sorted(POLICIES))
    return p


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    return RouterConfig(
        model_path=args.model_path,
        workers=tuple(args.worker),
        prefill=tuple(args.prefill),
        decode=tuple(args.decode),
        served_model_name=args.served_model_name,
        host=args.host,
        port=args.port,
        max_body_bytes=args.max_body_bytes,
        startup_timeout_s=args.startup_timeout,
        policy=args.policy,
    )
