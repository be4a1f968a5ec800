"""Worker processes for end-to-end tests, started by the same code the launcher uses."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from cluster.local import Child, start_child, stop_child, wait_ready

WORKER_FLAGS = ("--max-total-tokens", "4096", "--transfer-timeout", "3")


@contextmanager
def worker(
    role: str,
    model_dir: Path,
    *extra: str,
    log_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[tuple[Child, str]]:
    """A running worker of `role` ("prefill", "decode" or "null"), yielding (child, endpoint);
    `env` is added to this process's environment (PDSERVE_TRANSFER_FAULTS, say)."""
    module = "prefill_worker" if role == "prefill" else "decode_worker"
    args = ["-m", module, "--disaggregation-mode", role, "--model-path", str(model_dir),
            "--host", "127.0.0.1", "--port", "0", *WORKER_FLAGS, *extra]  # fmt: skip
    environ = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    child = start_child(f"{role}-worker", args, environ, log_dir)
    try:
        ready = wait_ready(child, timeout_s=120)
        yield child, str(ready["endpoint"])
    finally:
        stop_child(child)
