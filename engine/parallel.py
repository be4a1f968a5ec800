"""Expert parallelism across the ranks of one instance: the process group and its settings.

A decode instance of N ranks runs one process per device. Attention is data-parallel (each
rank its own requests and KV pool); every MoE layer's experts are sharded over the N ranks,
tokens travelling to their experts and back by all-to-all. The group is the default
`torch.distributed` group: gloo on CPU, NCCL on CUDA, HCCL on NPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from engine.device import Device


@dataclass(frozen=True)
class ParallelConfig:
    ep_size: int = 1
    rank: int = 0
    num_redundant_experts: int = 0

    def __post_init__(self) -> None:
        if self.ep_size < 1:
            raise ValueError(f"ep_size must be >= 1, got {self.ep_size}")
        if not 0 <= self.rank < self.ep_size:
            raise ValueError(f"rank must be in [0, {self.ep_size}), got {self.rank}")
        if self.num_redundant_experts < 0:
            raise ValueError(
                f"num_redundant_experts must be >= 0, got {self.num_redundant_experts}"
            )

    @property
    def enabled(self) -> bool:
        return self.ep_size > 1


def init_process_group(
    parallel: ParallelConfig, device: Device, master: str, timeout_s: float = 60.0
) -> None:
    """Join the instance's group (`master` is host:port of rank 0's rendezvous).

    The timeout bounds every collective, so a dead rank turns into an error on the others
    instead of a hang.
    """
    if dist.is_initialized():
        raise RuntimeError("the process group is already initialised")
    # NCCL and HCCL run the object collectives (the lockstep's broadcast and gather) on the
    # current device: each rank's own, not device 0 for all.
    device.make_current()
    try:
        dist.init_process_group(
            backend=device.dist_backend,
            init_method=f"tcp://{master}",
            rank=parallel.rank,
            world_size=parallel.ep_size,
            timeout=timedelta(seconds=timeout_s),
        )
    except dist.DistError as exc:  # torch's, with its C++ frames: the first line is the news
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GroupJoinError(
            f"rank {parallel.rank} of {parallel.ep_size} could not join the group at {master} "
            f"({first}); check --dist-init-addr and that every rank starts"
        ) from None


class GroupJoinError(ConnectionError):
    """A rank could not join its instance's group: the rendezvous address, or a rank that
    never came."""
