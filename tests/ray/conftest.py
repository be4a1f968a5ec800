"""Ray tests run in a network namespace that has only loopback (`make test` arranges it):
Ray refuses a loopback node address and would otherwise pick the machine's interface."""

from __future__ import annotations

import socket

import pytest


def only_loopback() -> bool:
    names = [name for _, name in socket.if_nameindex()]
    return names == ["lo"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if only_loopback():
        return
    skip = pytest.mark.skip(reason="Ray tests run inside a loopback-only netns (make test-ray)")
    for item in items:
        if "tests/ray/" in str(item.fspath):
            item.add_marker(skip)
