"""An operator's first hour (issue 20): what a new user meets at the console."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.local import ChildFailed, LocalClusterSpec, start_child, wait_ready, worker_argvs
from decode_worker import MODES as DECODE_MODES
from router.config import build_parser as router_parser
from worker.args import build_parser as worker_parser


def test_help_shows_defaults() -> None:
    router = " ".join(router_parser().format_help().split())
    assert "--max-body-bytes MAX_BODY_BYTES (default: 8388608)" in router
    assert "--max-sequences-per-request" in router and "(default: 256)" in router
    worker = " ".join(worker_parser(DECODE_MODES).format_help().split())
    assert "--transfer-timeout TRANSFER_TIMEOUT seconds (default: 30.0)" in worker
    assert "--page-size PAGE_SIZE (default: 16)" in worker


def test_cli_without_a_cluster_is_one_clear_line(tmp_path: Path) -> None:
    """`pdserve status|down|scale` with no cluster: one line and exit code 1, no traceback."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["TMPDIR"] = str(tmp_path)  # Ray looks for a running cluster under it: none there
    for command in (["status"], ["down"], ["scale", "--prefill", "2"]):
        proc = subprocess.run(
            [sys.executable, "-m", "cluster.cli", *command],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert proc.returncode == 1, (command, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: no Ray cluster is running"), lines
        assert "pdserve up" in lines[0]


def test_failed_child_shows_its_error_and_log_and_old_logs_are_kept(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    script = "import sys; print('ValueError: --model-path /nowhere has no config.json', "
    script += "file=sys.stderr); sys.exit(2)"
    for run in range(3):
        child = start_child("prefill-0", ["-c", script], env, tmp_path)
        with pytest.raises(ChildFailed) as info:
            wait_ready(child, timeout_s=30)
        message = str(info.value)
        assert "prefill-0" in message and str(tmp_path / "prefill-0.log") in message, message
        assert "--model-path /nowhere has no config.json" in message
        (tmp_path / "prefill-0.log").open("a").write(f"run {run}\n")
    # Restarts rotate the logs: the newest is NAME.log, the run before NAME.log.1, ...
    assert "run 2" in (tmp_path / "prefill-0.log").read_text()
    assert "run 1" in (tmp_path / "prefill-0.log.1").read_text()
    assert "run 0" in (tmp_path / "prefill-0.log.2").read_text()


def test_local_passes_flags_to_one_role_only() -> None:
    spec = LocalClusterSpec(
        model_path="m",
        engine_args=("--page-size", "1"),
        prefill_args=("--chunked-prefill-size", "512"),
        decode_args=("--ep-size", "2"),
    )
    argvs = dict(worker_argvs(spec))
    assert argvs["prefill"][-4:] == ["--page-size", "1", "--chunked-prefill-size", "512"]
    assert argvs["decode"][-4:] == ["--page-size", "1", "--ep-size", "2"]
    colocated = worker_argvs(LocalClusterSpec(model_path="m", colocated=True, decode_args=("x",)))
    assert colocated[0][0] == "worker" and colocated[0][1][-1] == "x"


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--log-dir", "/proc/pdserve-logs"], "error: --log-dir /proc/pdserve-logs: "),
        (["--metrics-targets", "/proc/nowhere/t.json"], "error: --metrics-targets /proc/nowhere/t"),
    ],
)
def test_local_with_paths_it_cannot_write_is_one_line(flags: list[str], expected: str) -> None:
    """Checked before any process starts: one line and exit code 2, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "local", *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, (flags, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), lines
    assert "starting pdserve" not in proc.stdout
