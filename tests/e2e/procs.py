"""Worker processes for end-to-end tests, started by the same code the launcher uses."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from cluster.local import Child, start_child, stop_children, wait_ready

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
    with workers(model_dir, (role, *extra), log_dir=log_dir, env=env) as [started]:
        yield started


@contextmanager
def workers(
    model_dir: Path,
    *specs: tuple[str, ...],
    log_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[list[tuple[Child, str]]]:
    """Workers of `specs` (each a role and its extra flags), started at once and stopped at
    once (each takes seconds of imports and model loading to start, and one to exit), yielding
    their (child, endpoint) in order. A log file is named by role and index past the first."""
    environ = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    children: list[Child] = []
    try:
        for i, (role, *extra) in enumerate(specs):
            module = "prefill_worker" if role == "prefill" else "decode_worker"
            args = ["-m", module, "--disaggregation-mode", role, "--model-path", str(model_dir),
                    "--host", "127.0.0.1", "--port", "0", *WORKER_FLAGS, *extra]  # fmt: skip
            name = f"{role}-worker" + (f"-{i}" if i else "")
            children.append(start_child(name, args, environ, log_dir))
        ready = [wait_ready(child, timeout_s=120) for child in children]
        yield [(c, str(r["endpoint"])) for c, r in zip(children, ready, strict=True)]
    finally:
        stop_children(children)
