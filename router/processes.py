"""``--processes N``: N router processes behind one port, as vLLM's ``--api-server-count``.

One Python event loop serves a few thousand requests a second; a host with more cores serves
more with more processes. The supervisor (the process started with ``--processes N``) starts N
children, each a whole router (its own worker sessions, health checks, registry watch and
policies) listening on the same address with ``SO_REUSEPORT``: the kernel spreads incoming
connections over them, and a connection stays with one process.

What the children share, and how:

- **Metrics**: every child writes its counters, gauges and histograms to files in the
  supervisor's directory (``prometheus_client``'s multiprocess mode); ``/metrics`` on any of
  them sums all. Per-worker gauges (health, circuit, load) are the answering child's view;
  ``router_worker_in_flight_requests`` counts that child's requests only.
- **Admin API**: a change (add, remove, drain) made through one child is forwarded to the
  others over their control sockets (Unix sockets in the directory), so all agree, and
  written to a journal there that a child started again replays before it serves.
- **Load shedding**: ``--max-concurrent-requests`` and ``--queue-size`` are totals, split
  evenly (rounded up) between the children.
- **Not shared**: each child's cache-aware tree sees the requests of its own connections
  only (a client's turns on one keep-alive connection stay together); round-robin turns
  are per child.

A child that dies is started again (after a second); SIGTERM or SIGINT to the supervisor
drains and stops every child.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path

from router.app.admission import AdmissionConfig
from router.config import RouterConfig

log = logging.getLogger(__name__)

METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"
RESTART_DELAY_S = 1.0
STOP_TIMEOUT_S = 30.0  # a child drains its requests on SIGTERM; killed after this


def control_socket(control_dir: str, index: int) -> str:
    return str(Path(control_dir) / f"router-{index}.sock")


def peers(config: RouterConfig) -> list[str]:
    """The control sockets of the other children of this child's supervisor."""
    if config.process_index is None or config.control_dir is None:
        return []
    return [
        control_socket(config.control_dir, i)
        for i in range(config.processes)
        if i != config.process_index
    ]


def journal(config: RouterConfig) -> Path | None:
    """The admin changes made so far, which a child started again replays."""
    return None if config.control_dir is None else Path(config.control_dir) / "admin.jsonl"


def child_admission(config: AdmissionConfig, processes: int) -> AdmissionConfig:
    """This child's share of the totals."""
    if processes == 1:
        return config
    return replace(
        config,
        max_concurrent=math.ceil(config.max_concurrent / processes),
        queue_size=math.ceil(config.queue_size / processes),
    )


class _Child:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None


async def supervise(config: RouterConfig, argv: Sequence[str]) -> int:
    """Run ``config.processes`` children until SIGTERM/SIGINT; prints the ready line once
    every child serves. Returns the exit status."""
    control_dir = tempfile.mkdtemp(prefix="pdserve-router-")
    os.chmod(control_dir, 0o700)
    metrics_dir = Path(control_dir) / "metrics"
    metrics_dir.mkdir()
    # Port 0: pick one now and hold it (bound, not listening) so the children can share it.
    holder: socket.socket | None = None
    port = config.port
    if port == 0:
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        holder = socket.socket(family, socket.SOCK_STREAM)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind((config.host, 0))
        port = holder.getsockname()[1]
    env = {**os.environ, METRICS_ENV: str(metrics_dir)}
    base = [sys.executable, "-m", "router", *argv, "--port", str(port)]
    children = [_Child(i) for i in range(config.processes)]
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)

    async def start(child: _Child) -> bool:
        """Start ``child``; True once it printed its ready line."""
        args = [*base, "--process-index", str(child.index), "--control-dir", control_dir]
        proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE, env=env)
        child.proc = proc
        assert proc.stdout is not None
        async for line in proc.stdout:
            with contextlib.suppress(ValueError):
                if json.loads(line).get("event") == "ready":
                    return True
        return False

    try:
        ready = await asyncio.gather(*(start(c) for c in children))
        if not all(ready):
            log.error("router: a child process failed to start; see its log above")
            return 2
        print(json.dumps({"event": "ready", "url": f"http://{_host(config.host)}:{port}",
                          "processes": config.processes}), flush=True)  # fmt: skip
        await _watch(children, start, stopping, metrics_dir)
        return 0
    finally:
        await _stop(children)
        if holder is not None:
            holder.close()
        shutil.rmtree(control_dir, ignore_errors=True)


async def _watch(
    children: list[_Child],
    restart: Callable[[_Child], Awaitable[bool]],
    stopping: asyncio.Event,
    metrics_dir: Path,
) -> None:
    """Restart children that die until ``stopping`` is set."""
    from prometheus_client import multiprocess

    stop_wait = asyncio.ensure_future(stopping.wait())
    try:
        while not stopping.is_set():
            waits = {asyncio.ensure_future(c.proc.wait()): c for c in children if c.proc}
            done, _ = await asyncio.wait({stop_wait, *waits}, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                if w not in done:
                    w.cancel()
            if stopping.is_set():
                return
            for w in done:
                child = waits.get(w)
                if child is None or child.proc is None:
                    continue
                log.error(
                    "router process %d (pid %d) exited with %s; starting it again in %gs",
                    child.index, child.proc.pid, child.proc.returncode, RESTART_DELAY_S,
                )  # fmt: skip
                # Its live gauges (running requests, queue depth) must not count any more.
                with contextlib.suppress(OSError):
                    multiprocess.mark_process_dead(child.proc.pid, str(metrics_dir))
                await asyncio.sleep(RESTART_DELAY_S)
                if not await restart(child):
                    log.error("router process %d did not come back", child.index)
    finally:
        stop_wait.cancel()


async def _stop(children: list[_Child]) -> None:
    running = [c.proc for c in children if c.proc is not None and c.proc.returncode is None]
    for proc in running:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(asyncio.gather(*(p.wait() for p in running)), STOP_TIMEOUT_S)
    except TimeoutError:
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await asyncio.gather(*(p.wait() for p in running))


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
