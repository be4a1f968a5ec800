"""The no-Ray launcher: router plus workers as child processes of this one, on one machine.

Each child prints one JSON "ready" line on stdout once it serves; the launcher waits for it,
so a started cluster is a working one. If any child dies, the cluster is stopped whole
(restarting is Ray's job, in its own issue).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

READY_TIMEOUT_S = 180.0


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[str]
    ready: dict[str, object] = field(default_factory=dict)


class ChildFailed(RuntimeError):
    """A child process exited or never became ready."""


def _start(name: str, args: list[str], env: dict[str, str], log_dir: Path | None) -> Child:
    stderr = open(log_dir / f"{name}.log", "w") if log_dir else None  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=env,
        start_new_session=True,  # a Ctrl-C reaches the launcher, which stops children in order
    )
    return Child(name, proc)


def _wait_ready(child: Child, timeout_s: float) -> dict[str, object]:
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
            raise ChildFailed(f"{child.name} exited with code {child.proc.returncode} at start")
        if time.monotonic() > deadline:
            raise ChildFailed(f"{child.name} was not ready after {timeout_s:.0f} s")
        reader.join(timeout=0.1)
    if not result:
        raise ChildFailed(f"{child.name} closed its output without becoming ready")
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


@dataclass(frozen=True)
class LocalClusterSpec:
    model_path: str
    colocated: bool = False
    host: str = "127.0.0.1"
    port: int = 8000
    load_format: str = "auto"
    engine_args: tuple[str, ...] = ()  # extra flags for every worker (e.g. --page-size 1)
    router_args: tuple[str, ...] = ()
    num_prefill: int = 1
    num_decode: int = 1
    log_dir: str | None = None


class LocalCluster:
    def __init__(self, spec: LocalClusterSpec) -> None:
        self.spec = spec
        self.children: list[Child] = []
        self.url = ""
        self.workers: dict[str, list[str]] = {}
        self.metrics: dict[str, str] = {}  # child name -> its /metrics URL

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> LocalCluster:
        spec = self.spec
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        log_dir = Path(spec.log_dir) if spec.log_dir else None
        if log_dir:
            log_dir.mkdir(parents=True, exist_ok=True)
        common = [
            "--model-path", spec.model_path, "--load-format", spec.load_format,
            "--host", spec.host, "--port", "0", *spec.engine_args,
        ]  # fmt: skip
        roles = (
            [("worker", "decode_worker", "null")]
            if spec.colocated
            else [("prefill", "prefill_worker", "prefill")] * spec.num_prefill
            + [("decode", "decode_worker", "decode")] * spec.num_decode
        )
        try:
            pending = []
            for i, (kind, module, mode) in enumerate(roles):
                args = ["-m", module, "--disaggregation-mode", mode, *common]
                pending.append((kind, _start(f"{kind}-{i}", args, env, log_dir)))
                self.children.append(pending[-1][1])
            for kind, child in pending:
                ready = _wait_ready(child, timeout_s)
                self.workers.setdefault(kind, []).append(str(ready["endpoint"]))
                self.metrics[child.name] = str(ready["metrics"])
            router_args = ["-m", "router", "--model-path", spec.model_path,
                           "--host", spec.host, "--port", str(spec.port)]  # fmt: skip
            for kind, endpoints in self.workers.items():
                for endpoint in endpoints:
                    router_args += [f"--{kind}", endpoint]
            router = _start("router", [*router_args, *spec.router_args], env, log_dir)
            self.children.append(router)
            self.url = str(_wait_ready(router, timeout_s)["url"])
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
        for c in reversed(self.children):
            if c.proc.poll() is None:
                c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for c in self.children:
            stop_child(c, max(0.1, deadline - time.monotonic()))
        self.children.clear()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
