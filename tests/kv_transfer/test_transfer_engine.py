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
