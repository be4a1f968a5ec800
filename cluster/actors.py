"""Ray actors that each host one pdserve process: a worker rank, the router, or Redis.

The actor starts its process in `__init__` and waits until it serves (its JSON "ready" line,
or a Redis PING). The process dies with the actor (PR_SET_PDEATHSIG), and the actor dies with
the process: a monitor thread exits the actor when its process exits unasked, so Ray's
`max_restarts` brings both back, and a fresh worker registers itself in Redis again with a
new port and new transfer sessions.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from cluster.local import Child, wait_ready

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: get SIGKILL when the actor process goes away."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def node_address() -> tuple[str, int]:
    """This node's address as Ray knows it, and a free port on it."""
    import ray

    ip = ray.util.get_node_ip_address()
    with socket.socket() as s:
        s.bind((ip, 0))
        return ip, int(s.getsockname()[1])


class ProcessHost:
    """Base of the actor classes (decorated with `ray.remote` where they are created)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_dir: str,
        ready: str = "line",  # "line": a JSON ready line; "redis": PING; "none": just started
        ready_timeout_s: float = 300.0,
        python: bool = True,
    ) -> None:
        self.name = name
        self.stopping = False
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        import ray

        # Workers bind and advertise the address of the node Ray placed them on.
        argv = [a.replace("{node_ip}", ray.util.get_node_ip_address()) for a in argv]
        cmd = [sys.executable, *argv] if python else argv
        log = open(Path(log_dir) / f"{name}.log", "a")  # noqa: SIM115 (lives with the process)
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE if ready == "line" else subprocess.DEVNULL,
            stderr=log,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=_die_with_parent,
        )
        self.ready: dict[str, Any] = {}
        if ready == "line":
            child = Child(name, self.proc, log_path=Path(log_dir) / f"{name}.log")
            self.ready = wait_ready(child, ready_timeout_s)
        elif ready == "redis":
            self.ready = {"url": wait_redis(argv, self.proc, ready_timeout_s)}
        self.started_at = time.time()
        threading.Thread(target=self._exit_with_process, daemon=True).start()

    def _exit_with_process(self) -> None:
        self.proc.wait()
        if not self.stopping:
            os._exit(1)  # the actor dies too, and Ray restarts it (max_restarts)

    def info(self) -> dict[str, Any]:
        import ray

        return {
            "name": self.name,
            "pid": self.proc.pid,
            "node": ray.util.get_node_ip_address(),
            "alive": self.proc.poll() is None,
            "started_at": self.started_at,
            **self.ready,
        }

    def stop(self, timeout_s: float = 90.0) -> int | None:
        """SIGTERM (a worker drains first), then SIGKILL after `timeout_s`."""
        self.stopping = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


def wait_redis(argv: list[str], proc: subprocess.Popen[str], timeout_s: float) -> str:
    import redis

    port = int(argv[argv.index("--port") + 1])
    host = argv[argv.index("--bind") + 1]
    password = argv[argv.index("--requirepass") + 1] if "--requirepass" in argv else None
    client = redis.Redis(host=host, port=port, password=password, socket_timeout=1)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.ping()
            auth = f":{password}@" if password else ""
            return f"redis://{auth}{host}:{port}/0"
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on {host}:{port}") from None
            time.sleep(0.05)


def redis_argv(host: str, port: int, workdir: str, password: str | None = None) -> list[str]:
    """An embedded redis-server bound to ``host``. Bound to a network address, Redis's
    protected mode refuses every client that is not on loopback unless a password is set
    (``DENIED Redis is running in protected mode``): the embedded one gets a random password,
    which the registry URL carries."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server)")
    argv = [binary, "--port", str(port), "--bind", host, "--save", "", "--appendonly", "no",
            "--dir", workdir]  # fmt: skip
    return argv if password is None else [*argv, "--requirepass", password]
