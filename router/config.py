"""The router's configuration: a frozen dataclass built from command-line flags."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from protos.cli_help import DefaultsHelpFormatter
from router.app.admission import AdmissionConfig
from router.app.auth import ENV_ADMIN_KEY, ENV_API_KEY, read_keys
from router.app.parsers.reasoning import REASONING_FORMATS
from router.app.parsers.tool_calls import TOOL_CALL_PARSERS
from router.client.dispatch import RetryConfig
from router.fleet.health import HealthConfig
from router.fleet.policies import POLICIES, CacheAwareOptions, PolicySpec
from router.fleet.registry import RegistryConfig
from router.fleet.worker import endpoint_of

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
    # n x prompts of one request: beyond this a 400, before any work (one request fanning out
    # into thousands of sequences would take every decode page and time out the rest).
    max_sequences_per_request: int = 256
    startup_timeout_s: float = 60.0  # how long discovery waits for the workers
    # Policies: --policy sets both roles; unset, prefill is cache_aware and decode least_load
    # (colocated workers use the decode policy, cache_aware by default: they own their cache).
    policy: str | None = None
    prefill_policy: str | None = None
    decode_policy: str | None = None
    cache_threshold: float = CacheAwareOptions.cache_threshold
    balance_abs_threshold: int = CacheAwareOptions.balance_abs_threshold
    balance_rel_threshold: float = CacheAwareOptions.balance_rel_threshold
    max_tree_size: int = CacheAwareOptions.max_tree_size
    # Resilience (each group validates its own flags).
    health: HealthConfig = field(default_factory=HealthConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    admin_key: str | None = field(default=None, repr=False)  # None: no admin API
    # The inference API's keys (router.app.auth); none: open. Never printed.
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    rate_limit_rps: float = 0.0  # per key; 0: no limit
    rate_limit_tpm: float = 0.0  # per key; 0: no limit
    auth_failures_per_minute: int = 10  # per client address, inference and admin keys
    stream_interval: int = 1  # streamed requests: tokens per message from the worker
    busy_poll_us: float = 0.0  # poll (never sleep) this long after client traffic; 0: off
    # The model's output formats (router.app.parsers): None leaves the output as plain content.
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    # --processes N: N router processes share the port (see router.processes). A child knows
    # its index and the supervisor's directory (control sockets, metrics files).
    processes: int = 1
    process_index: int | None = None
    control_dir: str | None = None

    def __post_init__(self) -> None:
        if not (Path(self.model_path) / "tokenizer.json").is_file():
            raise ValueError(f"--model-path {self.model_path!r} has no tokenizer.json")
        if self.workers and (self.prefill or self.decode):
            raise ValueError("give either --worker URLs, or --prefill and --decode URLs")
        if self.registry.url is None:
            # Without a registry the static workers are all there is.
            if not (self.workers or self.prefill or self.decode):
                raise ValueError(
                    "give either --worker URLs, or --prefill and --decode URLs (or --registry)"
                )
            if (self.prefill or self.decode) and not (self.prefill and self.decode):
                raise ValueError("disaggregated mode needs at least one --prefill and one --decode")
        if self.admin_key is not None and not self.admin_key.strip():
            raise ValueError("--admin-key must not be empty")
        if self.rate_limit_rps < 0 or self.rate_limit_tpm < 0:
            raise ValueError(
                f"--rate-limit-rps and --rate-limit-tpm must be >= 0 (0: no limit), got "
                f"{self.rate_limit_rps}, {self.rate_limit_tpm}"
            )
        if (self.rate_limit_rps or self.rate_limit_tpm) and not self.api_keys:
            raise ValueError(
                f"--rate-limit-rps and --rate-limit-tpm are per API key: set {ENV_API_KEY} or "
                "--api-key-file too"
            )
        if self.auth_failures_per_minute < 1:
            raise ValueError(
                f"--auth-failures-per-minute must be >= 1, got {self.auth_failures_per_minute}"
            )
        for url in (*self.workers, *self.prefill, *self.decode):
            endpoint_of(url)  # raises ValueError naming the URL
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port must be in [0, 65535], got {self.port}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"--max-body-bytes must be >= 1024, got {self.max_body_bytes}")
        if self.max_sequences_per_request < 1:
            raise ValueError(
                f"--max-sequences-per-request must be >= 1, got {self.max_sequences_per_request}"
            )
        if self.startup_timeout_s <= 0:
            raise ValueError(f"--startup-timeout must be > 0, got {self.startup_timeout_s}")
        for flag, name in (
            ("--policy", self.policy),
            ("--prefill-policy", self.prefill_policy),
            ("--decode-policy", self.decode_policy),
        ):
            if name is not None and name not in POLICIES:
                raise ValueError(f"{flag} must be one of {sorted(POLICIES)}, got {name!r}")
        self._cache_aware_options()  # ValueError naming the bad threshold
        if self.stream_interval < 1:
            raise ValueError(f"--stream-interval must be >= 1, got {self.stream_interval}")
        if not 0 <= self.busy_poll_us <= 1e6:
            raise ValueError(f"--busy-poll-us must be in [0, 1000000], got {self.busy_poll_us}")
        if self.processes < 1:
            raise ValueError(f"--processes must be >= 1, got {self.processes}")
        for flag, value, known in (
            ("--tool-call-parser", self.tool_call_parser, TOOL_CALL_PARSERS),
            ("--reasoning-parser", self.reasoning_parser, REASONING_FORMATS),
        ):
            if value is not None and value not in known:
                raise ValueError(f"{flag} must be one of {sorted(known)}, got {value!r}")
        if self.process_index is not None and not (
            0 <= self.process_index < self.processes and self.control_dir
        ):
            raise ValueError(
                f"--process-index {self.process_index} needs --control-dir and must be in "
                f"[0, --processes {self.processes})"
            )

    def _cache_aware_options(self) -> CacheAwareOptions:
        return CacheAwareOptions(
            cache_threshold=self.cache_threshold,
            balance_abs_threshold=self.balance_abs_threshold,
            balance_rel_threshold=self.balance_rel_threshold,
            max_tree_size=self.max_tree_size,
        )

    @property
    def prefill_policy_spec(self) -> PolicySpec:
        """The prefill workers' policy (``make_policy(spec, load_of)`` builds it)."""
        name = self.prefill_policy or self.policy or "cache_aware"
        return PolicySpec(name, self._cache_aware_options())

    @property
    def decode_policy_spec(self) -> PolicySpec:
        """The decode workers' policy, which colocated workers use too."""
        default = "cache_aware" if self.workers else "least_load"
        name = self.decode_policy or self.policy or default
        return PolicySpec(name, self._cache_aware_options())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m router",
        description="pdserve router: the OpenAI-compatible HTTP front",
        formatter_class=DefaultsHelpFormatter,
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
        "--max-sequences-per-request",
        type=int,
        default=256,
        help="most sequences (n x prompts) one request may ask for; more is a 400",
    )
    p.add_argument(
        "--startup-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for every worker's GetInfo",
    )
    policies = sorted(POLICIES)
    p.add_argument(
        "--policy",
        choices=policies,
        help="policy of both roles (default: cache_aware for prefill and colocated workers, "
        "least_load for decode)",
    )
    p.add_argument("--prefill-policy", choices=policies, help="prefill workers' policy")
    p.add_argument(
        "--decode-policy", choices=policies, help="decode (and colocated) workers' policy"
    )
    p.add_argument(
        "--cache-threshold",
        type=float,
        default=CacheAwareOptions.cache_threshold,
        help="cache_aware: route by cache when matched/prompt tokens exceed this",
    )
    p.add_argument(
        "--balance-abs-threshold",
        type=int,
        default=CacheAwareOptions.balance_abs_threshold,
        help="cache_aware: load is imbalanced when max - min requests exceed this ...",
    )
    p.add_argument(
        "--balance-rel-threshold",
        type=float,
        default=CacheAwareOptions.balance_rel_threshold,
        help="... and max > min * this; then the least loaded worker gets the request",
    )
    p.add_argument(
        "--max-tree-size",
        type=int,
        default=CacheAwareOptions.max_tree_size,
        help="cache_aware: prompt tokens remembered per worker (LRU beyond)",
    )
    RegistryConfig.add_args(p)
    HealthConfig.add_args(p)
    RetryConfig.add_args(p)
    AdmissionConfig.add_args(p)
    g = p.add_argument_group("keys and rate limits")
    g.add_argument(
        "--api-key-file",
        help=f"file of inference API keys, one per line (also {ENV_API_KEY}, comma-separated); "
        "with any, /v1/* and /generate need Authorization: Bearer KEY",
    )
    g.add_argument(
        "--admin-key-file",
        help=f"file holding the admin API's key (or {ENV_ADMIN_KEY}); enables /admin/*",
    )
    g.add_argument(
        "--admin-key",
        help=f"the admin key itself (visible in ps: prefer {ENV_ADMIN_KEY} or --admin-key-file)",
    )
    g.add_argument(
        "--rate-limit-rps", type=float, default=0.0,
        help="requests per second per API key (0: no limit)",
    )  # fmt: skip
    g.add_argument(
        "--rate-limit-tpm", type=float, default=0.0,
        help="prompt + completion tokens per minute per API key (0: no limit)",
    )  # fmt: skip
    g.add_argument(
        "--auth-failures-per-minute", type=int, default=10,
        help="failed authentications one client address may make per minute before 429s",
    )  # fmt: skip
    p.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        help="streamed requests: the workers send tokens every this many steps (fewer "
        "messages and SSE events, each with more tokens; SGLang's --stream-interval)",
    )
    p.add_argument(
        "--busy-poll-us",
        type=float,
        default=0.0,
        help="keep polling the sockets this many µs after a request arrives or a reply goes "
        "out instead of sleeping: lower latency at low load for up to a core per process "
        "while traffic flows (0: off)",
    )
    p.add_argument(
        "--tool-call-parser",
        choices=sorted(TOOL_CALL_PARSERS),
        help="read tool calls in the model's format from chat output (deepseekv3: DeepSeek-V3 "
        "and R1; qwen25, qwen3, qwen, hermes: Qwen2.5/Qwen3's Hermes style; kimi_k2: "
        "Kimi-K2); without it, tools reach the chat template but replies are plain content",
    )
    p.add_argument(
        "--reasoning-parser",
        choices=sorted(REASONING_FORMATS),
        help="put the model's thinking into reasoning_content (deepseek-r1, qwen3: "
        "<think>...</think>; kimi: also ◁think▷...◁/think▷)",
    )
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="router processes sharing the port (SO_REUSEPORT), one event loop each",
    )
    # Set by the supervisor of --processes N for each child; not for people.
    p.add_argument("--process-index", type=int, help=argparse.SUPPRESS)
    p.add_argument("--control-dir", help=argparse.SUPPRESS)
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
        max_sequences_per_request=args.max_sequences_per_request,
        startup_timeout_s=args.startup_timeout,
        policy=args.policy,
        prefill_policy=args.prefill_policy,
        decode_policy=args.decode_policy,
        cache_threshold=args.cache_threshold,
        balance_abs_threshold=args.balance_abs_threshold,
        balance_rel_threshold=args.balance_rel_threshold,
        max_tree_size=args.max_tree_size,
        health=HealthConfig.from_args(args),
        retry=RetryConfig.from_args(args),
        registry=RegistryConfig.from_args(args),
        admission=AdmissionConfig.from_args(args),
        admin_key=_admin_key(args),
        api_keys=read_keys(os.environ.get(ENV_API_KEY), args.api_key_file),
        rate_limit_rps=args.rate_limit_rps,
        rate_limit_tpm=args.rate_limit_tpm,
        auth_failures_per_minute=args.auth_failures_per_minute,
        stream_interval=args.stream_interval,
        busy_poll_us=args.busy_poll_us,
        tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser,
        processes=args.processes,
        process_index=args.process_index,
        control_dir=args.control_dir,
    )


def _admin_key(args: argparse.Namespace) -> str | None:
    """--admin-key, else the first key of --admin-key-file, else PDSERVE_ADMIN_KEY."""
    if args.admin_key is not None:
        return str(args.admin_key)
    keys = read_keys(None, args.admin_key_file) if args.admin_key_file else ()
    if keys:
        return keys[0]
    if args.admin_key_file:
        raise ValueError(f"--admin-key-file {args.admin_key_file!r} holds no key")
    return os.environ.get(ENV_ADMIN_KEY) or None
