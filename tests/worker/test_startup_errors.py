"""A worker started with a bad engine setting says so in one line and exits: no traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.parametrize(
    ("flags", "env", "expected"),
    [
        (["--page-size", "0"], {}, "page_size must be >= 1"),
        ([], {"PDSERVE_PDL": "sometimes"}, "PDSERVE_PDL must be one of"),
        ([], {"PDSERVE_DECODE_TILES": "48,4,3"}, "PDSERVE_DECODE_TILES needs keys"),
        ([], {"PDSERVE_DECODE_SPLITS": "16,0"}, "PDSERVE_DECODE_SPLITS must be MAX[,MIN_TILES]"),
        ([], {"PDSERVE_MLA_DECODE_TILES": "32,4,3"}, "PDSERVE_MLA_DECODE_TILES must be KEYS"),
        (["--model-path", "/nonexistent"], {}, "no config.json in /nonexistent"),
        (["--session-port", "70000"], {}, "--session-port must be in [-1, 65535]"),
        (["--transfer-timeout", "-1"], {}, "--transfer-timeout must be a positive number"),
        # TEST-NET-1: never an address of this machine.
        (["--host", "192.0.2.1"], {}, "cannot listen on 192.0.2.1"),
        pytest.param(
            ["--device", "cuda"],
            {},
            "or pass --device cpu",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this host has CUDA"),
        ),
    ],
)
def test_a_bad_engine_setting_is_one_line(
    tiny_models: dict[str, Path], flags: list[str], env: dict[str, str], expected: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "decode_worker", "--model-path", str(tiny_models["llama"]),
         "--port", "0", *flags],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )  # fmt: skip
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert any("worker cannot start" in line and expected in line for line in lines), done.stderr


def test_a_port_in_use_is_one_line_before_the_model_loads(tiny_models: dict[str, Path]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "decode_worker", "--model-path", str(tiny_models["llama"]),
             "--host", "127.0.0.1", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )  # fmt: skip
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert f"cannot listen on 127.0.0.1:{port}" in last and "--port free" in last, last
    assert "KV pool" not in done.stderr  # the engine never started
