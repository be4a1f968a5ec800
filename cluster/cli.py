"""The `pdserve` command.

    pdserve local [--model-path DIR] [--load-format dummy] [--colocated] [--port 8000]
                  [--device cuda] [--prefill-args '...'] [--decode-args '...']

starts a router plus one prefill and one decode worker (or one colocated worker) on this
machine and serves until Ctrl-C. With no --model-path it serves the embedded default: a small
Qwen3-MoE checkpoint generated locally, on the CPU.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

from cluster.local import SHARED_GPU_MEM_FRACTION, ChildFailed, LocalCluster, LocalClusterSpec
from cluster.metrics import write_file_sd
from protos.cli_help import DefaultsHelpFormatter


def local_spec(args: argparse.Namespace, extra: list[str]) -> LocalClusterSpec:
    """The cluster `pdserve local` starts. Flags it does not know go to every worker; on
    GPUs, disaggregated workers hand KV over with `cuda_ipc` unless --transfer-backend says
    otherwise. Raises ValueError naming a bad value."""
    model_path = args.model_path
    if model_path is None:
        from engine.cli import default_model_dir

        model_path = str(default_model_dir())
    engine_args = list(extra)
    on_gpu = args.device is not None and args.device.startswith("cuda")
    if (
        on_gpu
        and not args.colocated
        and not any(a == "--transfer-backend" or a.startswith("--transfer-backend=") for a in extra)
    ):
        engine_args += ["--transfer-backend", "cuda_ipc"]
    return LocalClusterSpec(
        model_path=model_path,
        colocated=args.colocated,
        host=args.host,
        port=args.port,
        load_format=args.load_format,
        engine_args=tuple(engine_args),
        router_args=tuple(shlex.split(args.router_args)),
        log_dir=args.log_dir,
        device=args.device,
        prefill_args=tuple(shlex.split(args.prefill_args)),
        decode_args=tuple(shlex.split(args.decode_args)),
        prefill_mem_fraction_static=args.prefill_mem_fraction_static,
        decode_mem_fraction_static=args.decode_mem_fraction_static,
    )


def _check_writable(log_dir: str, targets: str | None) -> None:
    """ValueError, before anything starts, unless the log directory can be made and written
    and the Prometheus targets file's directory exists and can be written."""
    try:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--log-dir {log_dir}: {exc.strerror or exc}") from None
    if not os.access(log_dir, os.W_OK):
        raise ValueError(f"--log-dir {log_dir} is not writable")
    if targets:
        parent = os.path.dirname(os.path.abspath(targets))
        if not (os.path.isdir(parent) and os.access(parent, os.W_OK)):
            raise ValueError(
                f"--metrics-targets {targets}: its directory {parent} does not exist or is not "
                "writable"
            )


def _local(args: argparse.Namespace, extra: list[str]) -> int:
    try:
        spec = local_spec(args, extra)
        placements = spec.placements()
        _check_writable(args.log_dir, args.metrics_targets)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model_path = spec.model_path
    if spec.device is not None:
        for place in placements:
            print(f"  {place.role} worker on {place.device} {' '.join(place.args)}".rstrip())
    cluster = LocalCluster(spec)
    print(f"starting pdserve ({'colocated' if args.colocated else 'prefill + decode'}) "
          f"on {model_path} ...", flush=True)  # fmt: skip
    try:
        cluster.start()
    except ChildFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    name = model_path.rstrip("/").split("/")[-1]
    print(f"\npdserve is serving {name} at {cluster.url}")
    for kind, endpoints in cluster.workers.items():
        print(f"  {kind}: {', '.join(endpoints)}")
    print("metrics:\n" + "".join(f"  {n}: {url}\n" for n, url in cluster.metrics.items()), end="")
    if args.metrics_targets:
        try:
            write_file_sd(cluster.metrics, args.metrics_targets)
        except OSError as exc:
            print(f"error: --metrics-targets {args.metrics_targets}: {exc}", file=sys.stderr)
            cluster.stop()
            return 1
        print(f"Prometheus file_sd targets in {args.metrics_targets}")
    print(
        f"\ntry:\n  curl {cluster.url}/v1/completions -H 'Content-Type: application/json' "
        f"""-d '{{"model": "{name}", "prompt": "The KV cache", "max_tokens": 16}}'\n"""
        f"\nlogs in {args.log_dir}; Ctrl-C stops.",
        flush=True,
    )
    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        while not stop:
            dead = cluster.dead_children()
            if dead:
                print(f"error: {', '.join(dead)} exited; stopping", file=sys.stderr)
                return 1
            time.sleep(0.5)
    finally:
        cluster.stop()
    return 0


class NoRayCluster(RuntimeError):
    """No Ray cluster answers at the address given."""


def _connect(address: str | None) -> Any:
    """Attach to a Ray cluster (None: start one inside this process) and find the controller;
    None if it has none. Raises NoRayCluster when no Ray cluster is there at all."""
    import ray

    from cluster.controller import CONTROLLER, NAMESPACE

    try:
        ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING)
    except (ConnectionError, TimeoutError) as exc:
        where = "on this machine" if address == "auto" else f"at {address}"
        raise NoRayCluster(
            f"no Ray cluster is running {where}, so no pdserve cluster is up "
            f"(start one with `pdserve up`, or pass --address): {str(exc).splitlines()[0]}"
        ) from None
    try:
        return ray.get_actor(CONTROLLER, namespace=NAMESPACE)
    except ValueError:
        return None


def _table(rows: list[dict[str, Any]]) -> str:
    cols = ["name", "role", "node", "endpoint", "ranks", "health", "restarts", "last_recovery_s"]
    cells = [[("" if r.get(c) is None else (f"{r[c]:.1f}" if isinstance(r[c], float) else
               str(r[c]))) for c in cols] for r in rows]  # fmt: skip
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


HEAD_NODE = "node:__internal_head__"  # the custom resource Ray gives its head node only


def _up(args: argparse.Namespace) -> int:
    import ray

    from cluster.controller import CONTROLLER, NAMESPACE, Controller
    from cluster.spec import ClusterSpec, SpecError

    try:
        spec = ClusterSpec.load(args.spec) if args.spec else ClusterSpec()
    except (OSError, SpecError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if _connect(None if args.foreground else args.address) is not None:
        print("error: a pdserve cluster is already up here (pdserve down first)", file=sys.stderr)
        return 1
    model_path = spec.model.path
    if model_path is None:
        from engine.cli import default_model_dir

        model_path = str(default_model_dir())
    start = time.monotonic()
    controller: Any = (
        ray.remote(Controller)
        # On the head node, where the spec's metrics port is published (deploy/k8s).
        .options(
            name=CONTROLLER,
            namespace=NAMESPACE,
            lifetime="detached",
            num_cpus=0,
            resources={HEAD_NODE: 0.001},
        )
        .remote(_spec_dict(args.spec), model_path, args.log_dir)
    )
    urls: dict[str, str] = ray.get(controller.up.remote())
    where = urls["url"] or "(router not started by Ray: router.enabled is false)"
    print(f"pdserve is up at {where} ({time.monotonic() - start:.1f} s; registry "
          f"{urls['redis']})\n")  # fmt: skip
    print(_table(ray.get(controller.status.remote())))
    if not args.foreground:
        return 0
    print("\nserving until Ctrl-C", flush=True)
    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    while not stop:
        time.sleep(0.5)
    ray.get(controller.down.remote())
    ray.shutdown()
    return 0


def _spec_dict(path: str | None) -> dict[str, Any]:
    import yaml

    return (yaml.safe_load(open(path).read()) or {}) if path else {}


def _none_up() -> int:
    print("no pdserve cluster is up", file=sys.stderr)
    return 1


def _status(args: argparse.Namespace) -> int:
    import ray

    controller = _connect(args.address)
    if controller is None:
        return _none_up()
    print(_table(ray.get(controller.status.remote())))
    return 0


def _scale(args: argparse.Namespace) -> int:
    import ray

    controller = _connect(args.address)
    if controller is None:
        return _none_up()
    try:
        print(_table(ray.get(controller.scale.remote(args.prefill, args.decode))))
    except ray.exceptions.RayTaskError as exc:
        print(f"error: {exc.cause}", file=sys.stderr)
        return 2
    return 0


def _down(args: argparse.Namespace) -> int:
    import ray

    controller = _connect(args.address)
    if controller is None:
        return _none_up()
    ray.get(controller.down.remote())
    ray.kill(controller)
    print("pdserve is down")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pdserve",
        description=__doc__.splitlines()[0],
        formatter_class=DefaultsHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    local = sub.add_parser(
        "local",
        help="router + workers as processes on this machine",
        formatter_class=DefaultsHelpFormatter,
    )
    local.add_argument("--model-path", help="HF model dir; none: the embedded tiny MoE")
    local.add_argument(
        "--load-format", default="auto", choices=["auto", "safetensors", "dummy"],
        help="how workers load weights",
    )  # fmt: skip
    local.add_argument("--colocated", action="store_true", help="one worker doing both phases")
    local.add_argument("--host", default="127.0.0.1", help="address every process binds")
    local.add_argument("--port", type=int, default=8000, help="the router's HTTP port")
    local.add_argument(
        "--log-dir", default="logs",
        help="where children's stderr goes (NAME.log; the runs before kept as NAME.log.1-5)",
    )  # fmt: skip
    local.add_argument(
        "--metrics-targets",
        help="write every process's /metrics address to this file, in Prometheus' file_sd format",
    )
    local.add_argument(
        "--device",
        help="every worker's device (cpu, cuda:N, ...); 'cuda': a GPU per worker while there "
        "are enough, else they share (prefill first, each with its own memory fraction)",
    )
    for role, example in (
        ("prefill", "--chunked-prefill-size 4096"),
        ("decode", "--max-running-requests 128"),
        ("router", "--policy round_robin"),
    ):
        local.add_argument(
            f"--{role}-args", default="",
            help=f"flags for the {role} only, as one string written with '=' "
            f"(--{role}-args='{example}'; colocated: decode's go to the worker); flags not "
            "known here go to every worker",
        )  # fmt: skip
    for role in ("prefill", "decode"):
        local.add_argument(
            f"--{role}-mem-fraction-static", type=float,
            help=f"the {role} worker's --mem-fraction-static (sharing one GPU: default "
            f"{SHARED_GPU_MEM_FRACTION[role]}, counting what workers started before it hold)",
        )  # fmt: skip
    up = sub.add_parser(
        "up",
        help="place a cluster spec on a Ray cluster and supervise it",
        formatter_class=DefaultsHelpFormatter,
    )
    up.add_argument("spec", nargs="?", help="cluster spec YAML (default: the embedded demo)")
    up.add_argument("--log-dir", default="/tmp/pdserve-logs", help="on every node")
    up.add_argument(
        "--foreground",
        action="store_true",
        help="start a one-machine Ray cluster in this process and serve until Ctrl-C",
    )
    commands = (
        ("status", "workers, roles, nodes, health, restarts"),
        ("scale", "add or drain workers"),
        ("down", "stop everything"),
    )
    for name, helptext in commands:
        p = sub.add_parser(name, help=helptext)
        if name == "scale":
            p.add_argument("--prefill", type=int)
            p.add_argument("--decode", type=int)
    for p in (up, *(sub.choices[n] for n in ("status", "scale", "down"))):
        p.add_argument("--address", default="auto", help="Ray cluster address")
    args, extra = parser.parse_known_args(argv)
    if args.command == "local":
        return _local(args, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return {"up": _up, "status": _status, "scale": _scale, "down": _down}[args.command](args)
    except NoRayCluster as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
