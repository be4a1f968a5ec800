"""Time from `pdserve up` to the first token, and recovery after each kind of kill.

Starts a one-machine Ray cluster, brings up a spec (default: 2 prefill replicas and one decode
instance of EP 2 on the tiny MoE model), then kills in turn a prefill worker's process and
one rank of the decode instance, timing until the supervisor reports the group healthy again
and a request succeeds. Run it where Ray may bind loopback, e.g. as root:

    unshare -n sh -c 'ip link set lo up && .venv/bin/python -m bench.cluster'
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PDSERVE = [sys.executable, "-m", "cluster.cli"]
RAY = str(Path(sys.executable).parent / "ray")


def cli(*args: str) -> str:
    out = subprocess.run([*PDSERVE, *args], capture_output=True, text=True, timeout=600)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return out.stdout


def rows() -> list[dict[str, str]]:
    lines = cli("status").strip().splitlines()
    header = lines[0].split()
    return [dict(zip(header, line.split(), strict=False)) for line in lines[1:]]


def first_token(url: str, timeout_s: float = 120) -> float:
    """Seconds until a one-token request through the router succeeds."""
    body = json.dumps({"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 1}})
    start = time.monotonic()
    while True:
        try:
            req = urllib.request.Request(
                url + "/generate", data=body.encode(), headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=30) as resp:
                resp.read()
            return time.monotonic() - start
        except OSError:
            if time.monotonic() - start > timeout_s:
                raise
            time.sleep(0.1)


def recover(pattern: str, group_role: str, url: str) -> tuple[float, float]:
    """Kill the first process matching `pattern`; (seconds to healthy, to a served request)."""
    now = rows()
    before = {r["name"]: int(r["restarts"]) for r in now}
    redis = next(r["endpoint"] for r in now if r["role"] == "redis")
    pid = subprocess.run(
        ["pgrep", "-f", f"{pattern}.*--registry {redis}"], capture_output=True, text=True
    ).stdout.split()[0]
    start = time.monotonic()
    subprocess.run(["kill", "-9", pid], check=True)
    while True:
        now = rows()
        back = [
            r for r in now if r["role"] == group_role and int(r["restarts"]) > before[r["name"]]
        ]
        if back and all(r["health"] == "ok" for r in now):
            healthy = time.monotonic() - start
            break
        time.sleep(0.2)
    first_token(url)
    return healthy, time.monotonic() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", help="default: the embedded tiny MoE model")
    parser.add_argument("--ep-size", type=int, default=2)
    parser.add_argument("--port", type=int, default=8300)
    args = parser.parse_args()
    if args.model_path is None:
        from engine.cli import default_model_dir

        args.model_path = str(default_model_dir())
    tmp = Path(tempfile.mkdtemp(prefix="pdserve-bench-"))
    spec = tmp / "spec.yaml"
    spec.write_text(
        f"model: {{path: {args.model_path}, engine_args: {{max-total-tokens: 4096}}}}\n"
        f"router: {{port: {args.port}}}\n"
        "prefill: {replicas: 2}\n"
        f"decode: {{instances: 1, ep_size: {args.ep_size}}}\n"
    )
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([RAY, "start", "--head", "--num-cpus", "16", "--include-dashboard", "false"],
                   check=True, capture_output=True, env=env)  # fmt: skip
    url = f"http://127.0.0.1:{args.port}"
    try:
        start = time.monotonic()
        cli("up", str(spec), "--log-dir", str(tmp / "logs"))
        up_s = time.monotonic() - start
        token_s = up_s + first_token(url)
        prefill = recover("prefill_worker --disaggregation-mode prefill", "prefill", url)
        rank = recover("decode_worker.ranks --rank 1", "decode", url)
        cli("down")
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True)
    print(f"spec: 2 prefill replicas + 1 decode instance of EP {args.ep_size}, "
          f"{args.model_path}, CPU, one machine")  # fmt: skip
    print("\n| event | healthy again s | first token s |\n|---|---:|---:|")
    print(f"| `pdserve up` (Ray already running) | {up_s:.1f} | {token_s:.1f} |")
    print(f"| prefill worker process killed | {prefill[0]:.1f} | {prefill[1]:.1f} |")
    print(f"| decode rank 1 killed (instance restarted whole) | {rank[0]:.1f} | {rank[1]:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
