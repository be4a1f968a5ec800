"""The engine factory and error helpers; no transport needed."""

from __future__ import annotations

import sys

import pytest

from kv_transfer import MooncakeTransferEngine, TransferError, check, create_transfer_engine


def test_check_names_the_operation_and_code() -> None:
    check(0, "register_memory")
    with pytest.raises(
        TransferError, match=r"batch_transfer_sync_write to h:1 failed with return code -1"
    ):
        check(-1, "batch_transfer_sync_write to h:1")


def test_unknown_backend_lists_known_ones() -> None:
    with pytest.raises(
        ValueError, match="unknown transfer backend 'nixl'; known backends: cuda_ipc, mooncake"
    ):
        create_transfer_engine("nixl")


def test_missing_mooncake_names_the_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mooncake.engine", None)  # makes the import fail
    with pytest.raises(ImportError) as info:
        MooncakeTransferEngine()
    message = str(info.value)
    for name in ("mooncake-transfer-engine", "mooncake-transfer-engine-non-cuda", "libibverbs1"):
        assert name in message


def test_mooncake_starts_quietly() -> None:
    """Issue 20: Mooncake's harmless start-up lines (glog's setup note, no RDMA device, ...)
    are held back; what else it writes would still show."""
    import os
    import subprocess
    import sys

    pytest.importorskip("mooncake.engine")
    code = (
        "import sys; from kv_transfer import create_transfer_engine; "
        "create_transfer_engine(); print('after', file=sys.stderr)"
    )
    env = {**os.environ, "MC_LOG_LEVEL": "WARNING"}  # as workers set it (configure_mooncake)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "after", proc.stderr
