"""The cluster spec: one YAML file says what to run and where.

    model:
      path: /models/Qwen3-30B-A3B      # omitted: the embedded tiny default (CPU demo)
      load_format: auto
      engine_args: {page-size: 16}     # flags for every worker, SGLang names
    router: {host: 0.0.0.0, port: 8000, args: {policy: cache_aware}}   # enabled: false when
                                       # the router runs elsewhere (a Kubernetes Deployment)
    prefill: {replicas: 2, device: GPU}
    decode: {instances: 1, ep_size: 8, device: GPU, num_redundant_experts: 8}
    # ray_resource (prefill and decode): a custom Ray resource each worker (each rank) takes
    # one unit of, to keep the roles on the nodes that advertise it (deploy/k8s does).
    redis: {address: embedded}         # or redis://host:6379/0
    metrics: {host: 0.0.0.0, port: 9400}   # the controller's /metrics and /targets; 0: off

Unknown keys and wrong types are errors that name the key and the value.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

DEVICES = ("CPU", "GPU", "NPU")
EMBEDDED = "embedded"


class SpecError(ValueError):
    """The spec is invalid; the message names the key and the value."""


def _take(raw: Any, where: str, allowed: dict[str, type | tuple[type, ...]]) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SpecError(f"{where} must be a mapping, got {type(raw).__name__}: {raw!r}")
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    for key, value in raw.items():
        want = allowed[key]
        if isinstance(value, bool) and want in (int, float):
            raise SpecError(f"{where}.{key} must be {want.__name__}, got {value!r}")
        if not isinstance(value, want):
            names = want.__name__ if isinstance(want, type) else "/".join(t.__name__ for t in want)
            raise SpecError(f"{where}.{key} must be {names}, got {value!r}")
    return dict(raw)


def _flags(raw: dict[str, Any], where: str) -> tuple[str, ...]:
    """{page-size: 16, disable-radix-cache: true} -> ("--page-size", "16", "--disable-...")."""
    out: list[str] = []
    for key, value in raw.items():
        if not isinstance(key, str) or key.startswith("-"):
            raise SpecError(f"{where}: flag names are written without dashes, got {key!r}")
        if value is True:
            out.append(f"--{key}")
        elif value is False or value is None:
            continue
        elif isinstance(value, list):
            for item in value:
                out += [f"--{key}", str(item)]
        else:
            out += [f"--{key}", str(value)]
    return tuple(out)


@dataclass(frozen=True)
class ModelSpec:
    path: str | None = None
    load_format: str = "auto"
    engine_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class RouterSpec:
    host: str = "127.0.0.1"
    port: int = 8000
    args: tuple[str, ...] = ()
    enabled: bool = True  # False: not started by Ray (it finds the workers through Redis)


@dataclass(frozen=True)
class PrefillSpec:
    replicas: int = 1
    device: str = "CPU"
    ray_resource: str = ""


@dataclass(frozen=True)
class DecodeSpec:
    instances: int = 1
    ep_size: int = 1
    device: str = "CPU"
    num_redundant_experts: int = 0
    ray_resource: str = ""


@dataclass(frozen=True)
class MetricsSpec:
    """Where the controller serves `/metrics` (restarts, health) and `/targets` (Prometheus
    HTTP service discovery of every worker); port 0 serves neither."""

    host: str = "127.0.0.1"
    port: int = 0


@dataclass(frozen=True)
class ClusterSpec:
    model: ModelSpec = field(default_factory=ModelSpec)
    router: RouterSpec = field(default_factory=RouterSpec)
    prefill: PrefillSpec = field(default_factory=PrefillSpec)
    decode: DecodeSpec = field(default_factory=DecodeSpec)
    redis: str = EMBEDDED
    metrics: MetricsSpec = field(default_factory=MetricsSpec)

    def __post_init__(self) -> None:
        if self.prefill.replicas < 0:
            raise SpecError(f"prefill.replicas must be >= 0, got {self.prefill.replicas}")
        if self.decode.instances < 1:
            raise SpecError(f"decode.instances must be >= 1, got {self.decode.instances}")
        if self.decode.ep_size < 1:
            raise SpecError(f"decode.ep_size must be >= 1, got {self.decode.ep_size}")
        if self.decode.num_redundant_experts < 0:
            raise SpecError(
                "decode.num_redundant_experts must be >= 0, got "
                f"{self.decode.num_redundant_experts}"
            )
        for role, device in (("prefill", self.prefill.device), ("decode", self.decode.device)):
            if device not in DEVICES:
                raise SpecError(f"{role}.device must be one of {DEVICES}, got {device!r}")
        if not (1 <= self.router.port <= 65535):
            raise SpecError(f"router.port must be in [1, 65535], got {self.router.port}")
        if not (0 <= self.metrics.port <= 65535):
            raise SpecError(f"metrics.port must be in [0, 65535] (0: off), got {self.metrics.port}")
        if self.redis != EMBEDDED and not self.redis.startswith("redis://"):
            raise SpecError(f"redis.address must be 'embedded' or redis://..., got {self.redis!r}")

    @property
    def colocated(self) -> bool:
        """No prefill replicas: decode instances serve both phases."""
        return self.prefill.replicas == 0

    @staticmethod
    def load(path: str | Path) -> ClusterSpec:
        text = Path(path).read_text()
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SpecError(f"{path} is not valid YAML: {exc}") from exc
        return ClusterSpec.from_dict(raw or {})

    @staticmethod
    def from_dict(raw: Any) -> ClusterSpec:
        top = _take(raw, "spec", {k: (dict, type(None)) for k in ("model", "router", "prefill",
                                                                 "decode", "redis",
                                                                 "metrics")})  # fmt: skip
        m = _take(top.get("model"), "model", {"path": str, "load_format": str, "engine_args": dict})
        if m.get("load_format", "auto") not in ("auto", "safetensors", "dummy"):
            raise SpecError(f"model.load_format must be auto, safetensors or dummy: {m}")
        r = _take(
            top.get("router"), "router", {"host": str, "port": int, "args": dict, "enabled": bool}
        )
        p = _take(
            top.get("prefill"), "prefill", {"replicas": int, "device": str, "ray_resource": str}
        )
        d = _take(
            top.get("decode"),
            "decode",
            {
                "instances": int,
                "ep_size": int,
                "device": str,
                "num_redundant_experts": int,
                "ray_resource": str,
            },
        )
        redis = _take(top.get("redis"), "redis", {"address": str})
        metrics = _take(top.get("metrics"), "metrics", {"host": str, "port": int})
        return ClusterSpec(
            model=ModelSpec(
                path=m.get("path"),
                load_format=m.get("load_format", "auto"),
                engine_args=_flags(m.get("engine_args", {}), "model.engine_args"),
            ),
            router=RouterSpec(
                host=r.get("host", "127.0.0.1"),
                port=r.get("port", 8000),
                args=_flags(r.get("args", {}), "router.args"),
                enabled=r.get("enabled", True),
            ),
            prefill=PrefillSpec(**p),
            decode=DecodeSpec(**d),
            redis=redis.get("address", EMBEDDED),
            metrics=MetricsSpec(**metrics),
        )

    def describe(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
