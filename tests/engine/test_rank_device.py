"""Which device each expert-parallel rank takes (`engine.device.rank_index`, `rank_device`)."""

from __future__ import annotations

import pytest

from engine.device import Device, rank_device, rank_index


def test_a_process_given_one_device_takes_it_whatever_its_rank() -> None:
    # Ray sets each actor's CUDA_VISIBLE_DEVICES to its own GPU: every rank sees one, as 0.
    assert [rank_index(r, 1) for r in range(8)] == [0] * 8


def test_ranks_sharing_a_host_take_their_own_device() -> None:
    assert [rank_index(r, 4) for r in range(4)] == [0, 1, 2, 3]


def test_more_ranks_than_devices_names_the_fix() -> None:
    with pytest.raises(ValueError, match="run at most 2 ranks a host"):
        rank_index(2, 2)
    with pytest.raises(ValueError):
        rank_index(-1, 2)


def test_cpu_ranks_share_the_cpu() -> None:
    assert rank_device("cpu", 0) == rank_device("cpu", 3) == Device("cpu", 0)


def test_a_group_it_cannot_join_is_one_line() -> None:
    """A rank whose rendezvous never answers (a wrong --dist-init-addr, rank 0 gone): one line
    naming the address and the flag, not torch's C++ frames."""
    import socket

    import torch.distributed as dist

    from engine.parallel import GroupJoinError, ParallelConfig, init_process_group

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    master = f"127.0.0.1:{port}"
    with pytest.raises(GroupJoinError) as info:
        init_process_group(ParallelConfig(2, 1), rank_device("cpu", 1), master, timeout_s=2)
    message = str(info.value)
    assert "\n" not in message and master in message and "--dist-init-addr" in message, message
    assert not dist.is_initialized()
