"""NVIDIA MPS (the Multi-Process Service) for the span of a block: processes sharing one GPU run
their kernels side by side instead of time-slicing it.

`mps_daemon` starts the control daemon with pipe and log directories of its own (so that it
meets no daemon already running on the host and needs no write access to /tmp/nvidia-mps),
checks that it answers, yields the variables a process needs to be its client, and stops it on
every way out. A process is a client when it starts with the same CUDA_MPS_PIPE_DIRECTORY.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CONTROL = "nvidia-cuda-mps-control"


class MPSUnavailable(RuntimeError):
    """The MPS daemon is missing or did not start; the message, one line, says what to do."""


def control_binary() -> str:
    """The path of `nvidia-cuda-mps-control`; raises MPSUnavailable when it is not on PATH."""
    path = shutil.which(CONTROL)
    if path is None:
        raise MPSUnavailable(
            f"--mps needs {CONTROL}, which is not on PATH: install the NVIDIA driver's "
            "utilities (the package with nvidia-smi, e.g. nvidia-utils-VERSION), or run "
            "without --mps"
        )
    return path


def _control(binary: str, args: list[str], command: str | None, env: dict[str, str],
             out: Path, timeout_s: float) -> tuple[int, str]:  # fmt: skip
    """Run the control program (with `command` on its stdin); its exit status and first
    line of output. The output goes through a file: the daemon `-d` forks may inherit it,
    and a pipe would then never reach end-of-file."""
    with out.open("w+") as sink:
        try:
            done = subprocess.run(
                [binary, *args], input=command, stdout=sink, stderr=subprocess.STDOUT,
                env=env, text=True, timeout=timeout_s, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return -1, f"no answer in {timeout_s:.0f} s"
        sink.seek(0)
        return done.returncode, next((line.strip() for line in sink if line.strip()), "")


@contextmanager
def mps_daemon(log_dir: Path, timeout_s: float = 30.0) -> Iterator[dict[str, str]]:
    """Run the MPS control daemon for the block; yield the environment its clients need
    (CUDA_MPS_PIPE_DIRECTORY and CUDA_MPS_LOG_DIRECTORY). Raises MPSUnavailable, with the fix
    in one line, when the program is missing or no daemon answers after `-d`."""
    binary = control_binary()
    log_dir = log_dir.resolve()  # the daemon leaves this directory for /
    log_dir.mkdir(parents=True, exist_ok=True)
    # The pipe directory holds a Unix socket, whose path must stay short (108 bytes): /tmp.
    with tempfile.TemporaryDirectory(prefix="pdserve-mps-") as pipe_dir:
        env = {"CUDA_MPS_PIPE_DIRECTORY": pipe_dir, "CUDA_MPS_LOG_DIRECTORY": str(log_dir)}
        full = {**os.environ, **env}
        out = log_dir / "control-client.txt"
        rc, said = _control(binary, ["-d"], None, full, out, timeout_s)
        forked = rc == 0
        if forked:
            # `-d` forks: that it returned 0 does not mean the daemon lives. Ask it.
            rc, said = _control(binary, [], "get_server_list\n", full, out, timeout_s)
        try:
            if rc != 0:
                raise MPSUnavailable(
                    f"the MPS daemon did not start ({CONTROL}: {said or f'exit {rc}'}; see "
                    f"{log_dir}/control.log): run as a user who may use the GPU, check that "
                    "its compute mode allows it (nvidia-smi -q -d COMPUTE), or run without --mps"
                )
            yield env
        finally:
            if forked:
                quit_rc, quit_said = _control(binary, [], "quit\n", full, out, timeout_s)
                if rc == 0 and quit_rc != 0:
                    print(f"warning: {CONTROL} quit: {quit_said or f'exit {quit_rc}'}",
                          file=sys.stderr)  # fmt: skip
