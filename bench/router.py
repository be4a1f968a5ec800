"""The router alone: pdserve's router and sglang-router in front of stub workers, one run.

Each router gets stub workers that answer at once (``bench.stub_worker``; one, or ``--stubs
N``): pdserve's router gRPC colocated stubs that stream 8 one-token chunks and a
``Complete``; sglang-router HTTP stubs that return a fixed non-streamed ``/v1/completions``
body. A keep-alive HTTP/1.1 load generator (raw asyncio protocol on uvloop, closed loop:
each connection sends its next request when the last reply is in) sends non-streamed
``/v1/completions`` at 1 and at 32 connections for ``--duration`` seconds each, after a
warm-up. The same generator against the HTTP stub directly gives the baseline and the
generator's own ceiling; "added" latency is a router's minus that baseline at the same
percentile and connection count.

    python -m bench.router                          # round_robin on both routers
    python -m bench.router --policy cache_aware     # both routers cache-aware
    python -m bench.router --profile /tmp/router.svg   # py-spy on pdserve's router at 32 conns
    python -m bench.router --skip-sglang --chunk-tokens 8   # 8 tokens in one gRPC message
    python -m bench.router --processes 1 2          # pdserve with 1, then 2 router processes
    python -m bench.router --mode disaggregated     # pdserve in front of a prefill+decode stub
    python -m bench.router --stream --skip-sglang   # streamed (SSE) requests, pdserve only
    python -m bench.router --worker-sessions grpcio # sessions on the stub's grpcio server
    python -m bench.router --busy-poll-us 0 300     # pdserve sleeping, then busy-polling
    python -m bench.router --stubs 4                # 4 stub workers behind each router

Needs ``pip install sglang-router`` for the comparison (skipped with a message if missing)
and ``pip install py-spy`` for ``--profile``. Every process shares this machine's cores:
router, stub and generator compete for CPU, as printed with the results.

The two routers do different work per request: sglang-router (HTTP mode) forwards the JSON
body to an HTTP worker and the reply back; pdserve's router parses and validates the body,
tokenizes the prompt, sends it on the worker's ``Decode.Session`` stream (batched with other
requests), detokenizes the reply and renders the OpenAI response. A non-streamed request
gets its tokens with the ``Complete`` (one message), as from a real worker. "router CPU" is
the router's processes together (all children under ``--processes N``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import itertools
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

REPO = Path(__file__).resolve().parents[1]
MODEL = "stub"
REQUEST = {"model": MODEL, "prompt": "The KV cache stores keys and values", "max_tokens": 8,
           "temperature": 0}  # fmt: skip
BODY = json.dumps(REQUEST).encode()
STREAM_BODY = json.dumps({**REQUEST, "stream": True}).encode()


# ---- load generator --------------------------------------------------------------------------


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection with one request outstanding at a time."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.reply: asyncio.Future[int] | None = None  # the status of the reply awaited
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).lower()
        at = head.find(b"\r\ncontent-length:")
        if at >= 0:
            line_end = head.find(b"\r\n", at + 2)
            length = int(head[at + 17 : line_end if line_end >= 0 else None])
            if len(self.buffer) < end + 4 + length:
                return
            del self.buffer[: end + 4 + length]
        elif b"\r\ntransfer-encoding: chunked" in head:
            tail = self.buffer.find(b"\r\n0\r\n\r\n", end)
            if tail < 0:
                return
            del self.buffer[: tail + 7]
        else:
            raise RuntimeError(f"reply without a length: {head[:200]!r}")
        if self.reply is not None and not self.reply.done():
            self.reply.set_result(int(head[9:12]))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.reply is not None and not self.reply.done():
            self.reply.set_exception(ConnectionError(f"connection lost: {exc}"))


@dataclass
class Run:
    """One measurement: a target at a connection count."""

    target: str
    connections: int
    elapsed_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    errors: int = 0
    cpu_s: float | None = None  # CPU time the router process (all threads) spent meanwhile
    stub_cpu_s: float | None = None  # and the stub workers behind it

    @property
    def rps(self) -> float:
        return len(self.latencies_s) / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def cpu_us_per_request(self) -> float | None:
        if self.cpu_s is None or not self.latencies_s:
            return None
        return 1e6 * self.cpu_s / len(self.latencies_s)

    @property
    def stub_cpu_us_per_request(self) -> float | None:
        if self.stub_cpu_s is None or not self.latencies_s:
            return None
        return 1e6 * self.stub_cpu_s / len(self.latencies_s)

    def percentile_ms(self, q: float) -> float:
        ordered = sorted(self.latencies_s)
        if not ordered:
            return float("nan")
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _drive(
    host: str, port: int, request: bytes, deadline: float, run: Run, loop: asyncio.AbstractEventLoop
) -> None:
    transport, conn = await loop.create_connection(_Connection, host, port)
    clock = time.perf_counter
    latencies = run.latencies_s
    try:
        while (start := clock()) < deadline:
            conn.reply = loop.create_future()
            transport.write(request)
            status = await conn.reply
            if status == 200:
                latencies.append(clock() - start)
            else:
                run.errors += 1
    finally:
        transport.close()


async def http_load(
    target: str, url: str, path: str, body: bytes, connections: int, duration_s: float
) -> Run:
    """Closed-loop load: ``connections`` keep-alive connections for ``duration_s``."""
    host, port_text = url.removeprefix("http://").rsplit(":", 1)
    port = int(port_text)
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    loop = asyncio.get_running_loop()
    run = Run(target, connections)
    start = time.perf_counter()
    deadline = start + duration_s
    await asyncio.gather(
        *(_drive(host, port, request, deadline, run, loop) for _ in range(connections))
    )
    run.elapsed_s = time.perf_counter() - start
    return run


async def grpc_load(endpoint: str, connections: int, duration_s: float) -> Run:
    """The gRPC stub called directly (python grpc.aio client, one channel): for reference."""
    import grpc

    from protos import common_pb2, decode_pb2, decode_pb2_grpc

    run = Run("stub (gRPC direct, grpc.aio client)", connections)
    sampling = common_pb2.SamplingParams(max_new_tokens=8)
    async with grpc.aio.insecure_channel(endpoint) as channel:
        stub = decode_pb2_grpc.DecodeStub(channel)

        async def one(i: int, deadline: float) -> None:
            n = 0
            while (start := time.perf_counter()) < deadline:
                msg = decode_pb2.DecodeRequest(
                    request=common_pb2.GenerateRequest(
                        request_id=f"b{i}-{n}", token_ids=[1, 2, 3, 4], sampling=sampling
                    )
                )
                n += 1
                async for _ in stub.Generate(msg):
                    pass
                run.latencies_s.append(time.perf_counter() - start)

        await asyncio.gather(*(one(i, time.perf_counter() + 1.0) for i in range(connections)))
        run.latencies_s.clear()  # that was the warm-up
        start = time.perf_counter()
        await asyncio.gather(*(one(i, start + duration_s) for i in range(connections)))
        run.elapsed_s = time.perf_counter() - start
    return run


# ---- processes -------------------------------------------------------------------------------


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[str]
    ready: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def child(
    name: str, args: Sequence[str], log_dir: Path, ready_line: bool = True
) -> Iterator[Child]:
    """``args`` as a process (stderr to ``log_dir/name.log``); with ``ready_line``, wait for
    its ``{"event": "ready", ...}`` stdout line. Stopped with SIGTERM on exit."""
    log: IO[str] = open(log_dir / f"{name}.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        list(args), cwd=REPO, stdout=subprocess.PIPE if ready_line else log, stderr=log,
        text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    c = Child(name, proc)
    try:
        if ready_line:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("{") and json.loads(line).get("event") == "ready":
                    c.ready = json.loads(line)
                    break
            else:
                raise RuntimeError(f"{name} exited before ready; see {log_dir / name}.log")
        yield c
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def wait_http(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer 200 within {timeout_s:g}s")
        time.sleep(0.2)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- the benchmark ---------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` and its children so far, all threads (Linux
    ``/proc``; the children of ``--processes N`` are counted while they live)."""
    total = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except FileNotFoundError:
            continue
    return total


async def measure(
    target: str,
    url: str,
    conns: Sequence[int],
    duration_s: float,
    warmup_s: float,
    pid: int | None = None,
    body: bytes = BODY,
    stubs: Sequence[int] = (),
) -> list[Run]:
    """One run per connection count; ``pid``: the router, ``stubs``: the stub workers behind
    it, whose CPU time is measured."""
    runs = []
    for n in conns:
        await http_load(target, url, "/v1/completions", body, n, warmup_s)
        cpu_before = cpu_seconds(pid) if pid else 0.0
        stub_before = sum(map(cpu_seconds, stubs))
        run = await http_load(target, url, "/v1/completions", body, n, duration_s)
        if pid:
            run.cpu_s = cpu_seconds(pid) - cpu_before
        if stubs:
            run.stub_cpu_s = sum(map(cpu_seconds, stubs)) - stub_before
        if run.errors or not run.latencies_s:
            raise RuntimeError(f"{target} at {n} connections: {run.errors} non-200 replies")
        runs.append(run)
    return runs


def _run_async(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    python = sys.version.split()[0]
    return f"{os.cpu_count()} cores ({cpu}), Linux {platform.release()}, Python {python}"


def table(runs: Sequence[Run], baseline: dict[int, Run]) -> str:
    rows = [
        "| router | connections | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms "
        "| router CPU µs/req | stub CPU µs/req |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in runs:
        base = baseline.get(r.connections)
        if base is None or r is base:
            added = ("-", "-")
        else:
            added = (
                f"{r.percentile_ms(0.5) - base.percentile_ms(0.5):+.3f}",
                f"{r.percentile_ms(0.99) - base.percentile_ms(0.99):+.3f}",
            )
        cpu = r.cpu_us_per_request
        stub = r.stub_cpu_us_per_request
        rows.append(
            f"| {r.target} | {r.connections} | {r.rps:,.0f} | {r.percentile_ms(0.5):.3f} | "
            f"{r.percentile_ms(0.99):.3f} | {added[0]} | {added[1]} | "
            f"{'-' if cpu is None else f'{cpu:,.0f}'} | {'-' if stub is None else f'{stub:,.0f}'} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.router", description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before each, not counted")
    p.add_argument("--connections", type=int, nargs="+", default=[1, 32])
    p.add_argument("--policy", default="round_robin", help="both routers' policy")
    p.add_argument(
        "--stubs",
        type=int,
        default=1,
        help="stub workers behind each router (HTTP for sglang-router, gRPC for pdserve; with "
        "--mode disaggregated, that many prefill and that many decode stubs), so that on a "
        "large host one Python stub is not what limits the router",
    )
    p.add_argument(
        "--processes",
        type=int,
        nargs="+",
        default=[1],
        help="pdserve router --processes values to measure (one set of rows each)",
    )
    p.add_argument(
        "--busy-poll-us",
        type=float,
        nargs="+",
        default=[0.0],
        help="pdserve router --busy-poll-us values to measure (one set of rows each)",
    )
    p.add_argument("--tokens", type=int, default=8, help="tokens the gRPC stub streams")
    p.add_argument(
        "--chunk-tokens",
        type=int,
        default=1,
        help="tokens per gRPC message from the stub (1, as a worker streams one per step)",
    )
    p.add_argument(
        "--profile",
        metavar="PATH",
        help="py-spy record pdserve's router at the most connections: a flame graph when PATH "
        "ends in .svg, else collapsed stacks",
    )
    p.add_argument(
        "--mode",
        choices=("colocated", "disaggregated"),
        default="colocated",
        help="pdserve behind colocated stubs, or prefill stubs and decode stubs",
    )
    p.add_argument(
        "--stream",
        action="store_true",
        help="streamed requests (SSE, a chunk per token); the HTTP stub still answers whole",
    )
    p.add_argument(
        "--stream-interval", type=int, default=1, help="pdserve router --stream-interval"
    )
    p.add_argument(
        "--worker-sessions",
        choices=("listener", "grpcio"),
        default="listener",
        help="the stub serves the router's sessions on its session listener, as workers do, "
        "or on its grpcio server only (--session-port -1)",
    )
    p.add_argument("--skip-sglang", action="store_true")
    args = p.parse_args(argv)
    if args.stubs < 1:
        p.error(f"--stubs must be >= 1, got {args.stubs}")

    have_sglang = importlib.util.find_spec("sglang_router") is not None
    if not have_sglang and not args.skip_sglang:
        print(
            "sglang-router is not installed: `pip install sglang-router` for the comparison "
            "(it is a benchmark-only dependency). Measuring pdserve alone.",
            file=sys.stderr,
        )
    py = sys.executable
    load_before = os.getloadavg()[0]
    results: list[Run] = []
    baseline: dict[int, Run] = {}
    with tempfile.TemporaryDirectory(prefix="bench-router-") as tmp:
        logs = Path(tmp)
        from engine.testing.tiny_models import write_tokenizer

        tokenizer_dir = write_tokenizer(logs / "tokenizer")
        with contextlib.ExitStack() as http_stubs:
            http = [
                http_stubs.enter_context(
                    child(f"http-stub-{i}", [py, "-m", "bench.stub_worker", "--kind", "http"],
                          logs)
                )
                for i in range(args.stubs)
            ]  # fmt: skip
            stub_urls = [f"http://{s.ready['endpoint']}" for s in http]
            runs = _run_async(
                measure("stub (HTTP direct)", stub_urls[0], args.connections, args.duration,
                        args.warmup)
            )  # fmt: skip
            results += runs
            baseline = {r.connections: r for r in runs}
            if have_sglang and not args.skip_sglang:
                port = free_port()
                sglang = [
                    py, "-m", "sglang_router.launch_router", "--worker-urls", *stub_urls,
                    "--host", "127.0.0.1", "--port", str(port), "--policy", args.policy,
                    "--log-level", "warn", "--disable-health-check",
                ]  # fmt: skip
                with child("sglang-router", sglang, logs, ready_line=False) as sg:
                    url = f"http://127.0.0.1:{port}"
                    wait_http(url + "/health")
                    results += _run_async(
                        measure("sglang-router", url, args.connections, args.duration,
                                args.warmup, sg.proc.pid, stubs=[s.proc.pid for s in http])
                    )  # fmt: skip
        stub_args = [
            py, "-m", "bench.stub_worker", "--kind", "grpc", "--tokens", str(args.tokens),
            "--chunk-tokens", str(args.chunk_tokens),
            "--session-port", "0" if args.worker_sessions == "listener" else "-1",
        ]  # fmt: skip
        disaggregated = args.mode == "disaggregated"
        with contextlib.ExitStack() as grpc_stubs:
            decode = [
                grpc_stubs.enter_context(
                    child(f"grpc-stub-{i}",
                          [*stub_args, "--role", "decode" if disaggregated else "null"], logs)
                )
                for i in range(args.stubs)
            ]  # fmt: skip
            prefill = [
                grpc_stubs.enter_context(
                    child(f"grpc-prefill-stub-{i}", [*stub_args, "--role", "prefill"], logs)
                )
                for i in range(args.stubs if disaggregated else 0)
            ]
            endpoints = [s.ready["endpoint"] for s in decode]
            workers = ["--worker", *endpoints]
            if disaggregated:
                workers = ["--prefill", *(s.ready["endpoint"] for s in prefill),
                           "--decode", *endpoints]  # fmt: skip
            stub_pids = [s.proc.pid for s in decode + prefill]
            for n, busy_us in itertools.product(args.processes, args.busy_poll_us):
                router_args = [
                    py, "-m", "router", "--model-path", str(tokenizer_dir), *workers,
                    "--port", "0", "--policy", args.policy, "--processes", str(n),
                    "--stream-interval", str(args.stream_interval),
                    "--busy-poll-us", f"{busy_us:g}",
                ]  # fmt: skip
                target = "pdserve" + (" P/D" if disaggregated else "")
                target += " streamed" if args.stream else ""
                target += f" interval {args.stream_interval}" if args.stream_interval > 1 else ""
                target += " grpcio sessions" if args.worker_sessions == "grpcio" else ""
                target += f" busy-poll {busy_us:g} µs" if busy_us else ""
                target += "" if n == 1 else f" ({n} processes)"
                with child(f"pdserve-router-{n}", router_args, logs) as r:
                    url = r.ready["url"]
                    pdserve = _run_async(
                        measure(target, url, args.connections, args.duration, args.warmup,
                                r.proc.pid, STREAM_BODY if args.stream else BODY, stub_pids)
                    )  # fmt: skip
                    results += pdserve
                    if args.profile and n == 1 and not busy_us:
                        profile(r.proc.pid, url, max(args.connections), args.duration,
                                args.profile)  # fmt: skip
            if not disaggregated:
                results += [
                    _run_async(grpc_load(endpoints[0], n, args.duration)) for n in args.connections
                ]

    per_role = " and role" if args.mode == "disaggregated" else ""
    print(f"\nmachine: {machine()}")
    print(
        f"1-minute load average: {load_before:.2f} before, {os.getloadavg()[0]:.2f} after "
        f"(other work on the machine skews every row)"
    )
    print(
        f"policy: {args.policy}; non-streamed /v1/completions, max_tokens 8; "
        f"{args.stubs} stub worker(s) per router{per_role}; "
        f"the gRPC stub sends {args.tokens} tokens, {args.chunk_tokens} per message; "
        f"{args.duration:g} s per row after {args.warmup:g} s warm-up; router, stub and load "
        f"generator share the machine's cores"
    )
    if have_sglang:
        from importlib.metadata import version

        print(f"sglang-router {version('sglang-router')}")
    print()
    print(table(results, baseline))
    sglang_runs = {r.connections: r for r in results if r.target == "sglang-router"}
    for run in (r for r in results if r.target.startswith("pdserve")):
        other = sglang_runs.get(run.connections)
        if other is not None:
            p50 = run.percentile_ms(0.5) / other.percentile_ms(0.5)
            print(
                f"{run.target}/sglang at {run.connections} connections: "
                f"req/s {run.rps / other.rps:.2f}x, p50 latency {p50:.2f}x"
            )
    return 0


def profile(pid: int, url: str, connections: int, duration_s: float, out: str) -> None:
    """py-spy record the router while the generator loads it; the SVG goes to ``out``."""
    svg = out.endswith(".svg")  # else collapsed stacks (``--format raw``), one per line
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("py-spy is not installed: `pip install py-spy` for --profile", file=sys.stderr)
        return
    rec = subprocess.Popen(
        [spy, "record", "-o", out, "--pid", str(pid), "--duration", str(int(duration_s)),
         "--rate", "200", "--nonblocking", "--format", "flamegraph" if svg else "raw"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(1.0)
    run = _run_async(http_load("pdserve (profiled)", url, "/v1/completions", BODY, connections,
                               duration_s))  # fmt: skip
    _, err = rec.communicate(timeout=60)
    print(
        f"profile: {out} ({run.rps:,.0f} req/s while sampled); py-spy: {err.strip()[-200:]}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    raise SystemExit(main())
