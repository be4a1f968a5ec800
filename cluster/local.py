"""The no-Ray launcher: router plus workers as child processes of this one, on one machine.

Each child prints one JSON "ready" line on stdout once it serves; the launcher waits for it,
so a started cluster is a working one. If any child dies, the cluster is stopped whole
(restarting is Ray's job, in its own issue).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

READY_TIMEOUT_S = 180.0


LOGS_KEPT = 5  # a child's earlier logs kept beside the current one: NAME.log.1 ... .5
ERROR_LINES = 12  # lines of a child's log shown when it fails to start


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[str]
    ready: dict[str, object] = field(default_factory=dict)
    log_path: Path | None = None  # where its stderr goes (None: this process's stderr)

    def failure(self, what: str) -> ChildFailed:
        """`what` happened to the child at start: the error names its log and ends with the
        log's last lines, so the console shows why without opening files."""
        if self.log_path is None:
            return ChildFailed(f"{self.name} {what} (its errors are in the output above)")
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-ERROR_LINES:]
        except OSError:
            tail = []
        shown = "".join(f"\n  | {line}" for line in tail) or "\n  | (the log is empty)"
        return ChildFailed(f"{self.name} {what}; its log is {self.log_path}, ending:{shown}")


def rotate_log(path: Path, keep: int = LOGS_KEPT) -> None:
    """Move `path` to `path.1` (and `.1` to `.2`, ... dropping the oldest) so that a restart
    keeps the logs of the runs before it."""
    if not path.exists():
        return
    for n in range(keep - 1, 0, -1):
        older = path.with_name(f"{path.name}.{n}")
        if older.exists():
            older.replace(path.with_name(f"{path.name}.{n + 1}"))
    path.replace(path.with_name(f"{path.name}.1"))


class ChildFailed(RuntimeError):
    """A child process exited or never became ready."""


def start_child(name: str, args: list[str], env: dict[str, str], log_dir: Path | None) -> Child:
    log_path = None if log_dir is None else log_dir / f"{name}.log"
    if log_path is not None:
        rotate_log(log_path)
    stderr = open(log_path, "w") if log_path else None  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=env,
        start_new_session=True,  # a Ctrl-C reaches the launcher, which stops children in order
    )
    return Child(name, proc, log_path=log_path)


def wait_ready(child: Child, timeout_s: float) -> dict[str, object]:
    """Read the child's stdout until its ready line; raise if it dies or takes too long."""
    result: dict[str, object] = {}
    assert child.proc.stdout is not None

    def read() -> None:
        assert child.proc.stdout is not None
        for line in child.proc.stdout:
            if line.startswith("{"):
                try:
                    msg = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if msg.get("event") == "ready":
                    result.update(msg)
                    break
        # Keep draining so the child never blocks on a full pipe.
        threading.Thread(target=child.proc.stdout.read, daemon=True).start()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout_s
    while reader.is_alive():
        if child.proc.poll() is not None:
            raise child.failure(f"exited with code {child.proc.returncode} at start")
        if time.monotonic() > deadline:
            raise child.failure(f"was not ready after {timeout_s:.0f} s")
        reader.join(timeout=0.1)
    if not result:
        # It closed its output because it is exiting: let its log be complete.
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.proc.wait(timeout=2)
        raise child.failure("closed its output without becoming ready")
    child.ready = result
    return result


def stop_child(child: Child, timeout_s: float = 10.0) -> None:
    """SIGTERM the child (a worker drains first), then SIGKILL it if it outlives `timeout_s`."""
    if child.proc.poll() is None:
        child.proc.send_signal(signal.SIGTERM)
    try:
        child.proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        child.proc.kill()
        child.proc.wait(timeout=5)


def stop_children(children: Sequence[Child], timeout_s: float = 10.0) -> None:
    """SIGTERM every child at once, in the order given (each drains meanwhile), then SIGKILL
    what outlives `timeout_s`."""
    for c in children:
        if c.proc.poll() is None:
            c.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for c in children:
        stop_child(c, max(0.1, deadline - time.monotonic()))


# When workers share one GPU: each role's --mem-fraction-static unless given. The engine sizes
# its pool as total x fraction minus what is in use when it starts, so the decode worker
# (started after the prefill worker is up) counts the prefill worker's share in its own.
SHARED_GPU_MEM_FRACTION = {"prefill": 0.4, "decode": 0.85}


@dataclass(frozen=True)
class WorkerPlacement:
    """Where one worker runs and what it gets beyond the common flags."""

    role: str  # "prefill", "decode" or "null" (colocated)
    device: str | None  # passed as --device; None: the worker's default
    args: tuple[str, ...]  # this worker's own flags, after the common ones (so they win)
    shares_device: bool = False  # another worker of this cluster is on the same device


@dataclass(frozen=True)
class LocalClusterSpec:
    model_path: str
    colocated: bool = False
    host: str = "127.0.0.1"
    port: int = 8000
    load_format: str = "auto"
    engine_args: tuple[str, ...] = ()  # extra flags for every worker (e.g. --page-size 1)
    router_args: tuple[str, ...] = ()  # extra flags for the router
    num_prefill: int = 1
    num_decode: int = 1
    log_dir: str | None = None
    # None: each worker picks its own (--device in engine_args, else auto). "cuda": one GPU
    # per worker while there are enough (visible GPUs, or gpu_count), else shared round-robin;
    # "cuda:N" (or any other value): every worker on that device.
    device: str | None = None
    gpu_count: int | None = None  # GPUs to place "cuda" workers on; None: torch's count
    prefill_args: tuple[str, ...] = ()  # flags for prefill workers only
    decode_args: tuple[str, ...] = ()  # flags for decode workers only (colocated: the worker)
    prefill_mem_fraction_static: float | None = None
    decode_mem_fraction_static: float | None = None
    # Variables set for every child beyond this process's own (e.g. NVIDIA MPS's directories).
    env: Mapping[str, str] = field(default_factory=dict)
    # And for one role's workers only (e.g. an MPS client priority or SM share for decode).
    prefill_env: Mapping[str, str] = field(default_factory=dict)
    decode_env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("prefill_mem_fraction_static", "decode_mem_fraction_static"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if self.gpu_count is not None and self.gpu_count < 1:
            raise ValueError(f"gpu_count must be >= 1, got {self.gpu_count}")
        if self.num_prefill < 1 or self.num_decode < 1:
            raise ValueError("num_prefill and num_decode must be >= 1")

    def child_env(self, kind: str | None = None) -> dict[str, str]:
        """The environment a child starts with: this process's, plus `env`, plus its role's
        (`kind` "prefill" or "decode"; the colocated "worker" and the router take none)."""
        own = {"prefill": self.prefill_env, "decode": self.decode_env}.get(kind or "", {})
        return {**os.environ, "PYTHONUNBUFFERED": "1", **self.env, **own}

    def placements(self) -> list[WorkerPlacement]:
        """Every worker's device and own flags, in start order (prefill workers first)."""
        roles = (
            ["null"]
            if self.colocated
            else ["prefill"] * self.num_prefill + ["decode"] * self.num_decode
        )
        devices: list[str | None]
        if self.device == "cuda":
            gpus = self.gpu_count if self.gpu_count is not None else _cuda_device_count()
            if gpus < 1:
                raise ValueError(
                    "--device cuda was asked for but no GPU is visible (check nvidia-smi and "
                    "CUDA_VISIBLE_DEVICES, or use --device cpu)"
                )
            devices = [f"cuda:{i % gpus}" for i in range(len(roles))]
        else:
            devices = [self.device] * len(roles)
        placed = []
        for i, (role, device) in enumerate(zip(roles, devices, strict=True)):
            shares = device is not None and device != "cpu" and devices.count(device) > 1
            args: list[str] = []
            fraction = (
                self.prefill_mem_fraction_static if role == "prefill"
                else self.decode_mem_fraction_static
            )  # fmt: skip
            if fraction is None and shares:
                # A shared device's later workers count the earlier ones' memory (see above).
                later = devices[:i].count(device) > 0
                fraction = SHARED_GPU_MEM_FRACTION["decode" if later else "prefill"]
            if fraction is not None:
                args += ["--mem-fraction-static", str(fraction)]
            args += self.prefill_args if role == "prefill" else self.decode_args
            placed.append(WorkerPlacement(role, device, tuple(args), shares))
        return placed


def _cuda_device_count() -> int:
    import torch

    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


_WORKER_KINDS = {  # role -> (kind, as children and the router name it; module)
    "prefill": ("prefill", "prefill_worker"),
    "null": ("worker", "decode_worker"),
    "decode": ("decode", "decode_worker"),
}


def worker_argvs(
    spec: LocalClusterSpec, placements: list[WorkerPlacement] | None = None
) -> list[tuple[str, list[str]]]:
    """(kind, python argv) of every worker in start order: the common flags, its device, then
    its own (memory fraction and its role's flags, so they win)."""
    common = [
        "--model-path", spec.model_path, "--load-format", spec.load_format,
        "--host", spec.host, "--port", "0", *spec.engine_args,
    ]  # fmt: skip
    argvs = []
    for place in spec.placements() if placements is None else placements:
        kind, module = _WORKER_KINDS[place.role]
        device = [] if place.device is None else ["--device", place.device]
        argvs.append((kind, ["-m", module, "--disaggregation-mode", place.role, *common,
                             *device, *place.args]))  # fmt: skip
    return argvs


class LocalCluster:
    def __init__(self, spec: LocalClusterSpec) -> None:
        self.spec = spec
        self.children: list[Child] = []
        self.url = ""
        self.workers: dict[str, list[str]] = {}
        self.metrics: dict[str, str] = {}  # child name -> its /metrics URL

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> LocalCluster:
        spec = self.spec
        env = spec.child_env()
        log_dir = Path(spec.log_dir) if spec.log_dir else None
        if log_dir:
            log_dir.mkdir(parents=True, exist_ok=True)
        placements = spec.placements()
        # Workers sharing a device start one after another: each sizes its KV pool from the
        # memory the ones before it left.
        one_by_one = any(p.shares_device for p in placements)
        try:
            pending = []
            for i, (kind, args) in enumerate(worker_argvs(spec, placements)):
                child = start_child(f"{kind}-{i}", args, spec.child_env(kind), log_dir)
                self.children.append(child)
                pending.append((kind, child))
                if one_by_one:
                    wait_ready(child, timeout_s)
            for kind, child in pending:
                ready = child.ready or wait_ready(child, timeout_s)
                self.workers.setdefault(kind, []).append(str(ready["endpoint"]))
                self.metrics[child.name] = str(ready["metrics"])
            router_args = ["-m", "router", "--model-path", spec.model_path,
                           "--host", spec.host, "--port", str(spec.port)]  # fmt: skip
            for kind, endpoints in self.workers.items():
                for endpoint in endpoints:
                    router_args += [f"--{kind}", endpoint]
            router = start_child("router", [*router_args, *spec.router_args], env, log_dir)
            self.children.append(router)
            self.url = str(wait_ready(router, timeout_s)["url"])
            self.metrics[router.name] = self.url + "/metrics"
        except BaseException:
            self.stop()
            raise
        return self

    def dead_children(self) -> list[str]:
        return [c.name for c in self.children if c.proc.poll() is not None]

    def child(self, name: str) -> Child:
        for c in self.children:
            if c.name == name:
                return c
        raise KeyError(f"no child named {name!r}; have {[c.name for c in self.children]}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM every child (router first), then SIGKILL what is still alive."""
        stop_children(self.children[::-1], timeout_s)
        self.children.clear()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
