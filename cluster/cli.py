"""The `pdserve` command.

    pdserve local [--model-path DIR] [--load-format dummy] [--colocated] [--port 8000]

starts a router plus one prefill and one decode worker (or one colocated worker) on this
machine and serves until Ctrl-C. With no --model-path it serves the embedded default: a small
Qwen3-MoE checkpoint generated locally, on the CPU.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

from cluster.local import ChildFailed, LocalCluster, LocalClusterSpec


def _local(args: argparse.Namespace, extra: list[str]) -> int:
    model_path = args.model_path
    if model_path is None:
        from engine.cli import default_model_dir

        model_path = str(default_model_dir())
    spec = LocalClusterSpec(
        model_path=model_path,
        colocated=args.colocated,
        host=args.host,
        port=args.port,
        load_format=args.load_format,
        engine_args=tuple(extra),
        log_dir=args.log_dir,
    )
    cluster = LocalCluster(spec)
    print(f"starting pdserve ({'colocated' if args.colocated else 'prefill + decode'}) "
          f"on {model_path} ...", flush=True)  # fmt: skip
    try:
        cluster.start()
    except ChildFailed as exc:
        print(f"error: {exc} (logs: {args.log_dir})", file=sys.stderr)
        return 1
    name = model_path.rstrip("/").split("/")[-1]
    print(f"\npdserve is serving {name} at {cluster.url}")
    for kind, endpoints in cluster.workers.items():
        print(f"  {kind}: {', '.join(endpoints)}")
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    local = sub.add_parser("local", help="router + workers as processes on this machine")
    local.add_argument("--model-path", help="HF model dir (default: embedded tiny MoE)")
    local.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    local.add_argument("--colocated", action="store_true", help="one worker doing both phases")
    local.add_argument("--host", default="127.0.0.1")
    local.add_argument("--port", type=int, default=8000)
    local.add_argument("--log-dir", default="logs", help="where children's stderr goes")
    args, extra = parser.parse_known_args(argv)
    if args.command == "local":
        return _local(args, extra)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
