"""What every worker has: the engine, its KV layout and transfer engine, its peers' channels,
and the RPCs common to both roles (abort, load, info)."""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass, field

import grpc

from engine.async_engine import AsyncEngine
from kv_transfer import KVLayout, KVPoolDescriptor, TransferEngine
from protos import cluster_token, common_pb2
from protos.cluster_tls import ClusterTls
from protos.contract import ROLES
from worker.convert import layout_to_proto
from worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSettings:
    role: str
    model_name: str
    endpoint: str  # this worker's gRPC address as peers reach it
    session_port: int = 0  # the session listener's (worker.session_server); 0: none
    transfer_timeout_s: float = 30.0  # every waiting state of a KV transfer
    rpc_timeout_s: float = 10.0  # worker-to-worker unary calls
    # Pages a peer may still write stay out of use until it acknowledges a revocation, or at
    # most this long when it cannot be reached (kv_transfer.fence).
    kv_quarantine_timeout_s: float = 300.0
    # Carried by every call to peers and required on every call here (protos.cluster_token).
    cluster_token: str | None = field(default=None, repr=False)
    # Mutual TLS to peers and on this worker's ports (protos.cluster_tls); None: plain TCP.
    cluster_tls: ClusterTls | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if min(self.transfer_timeout_s, self.rpc_timeout_s, self.kv_quarantine_timeout_s) <= 0:
            raise ValueError(
                "--transfer-timeout, the RPC timeout and --kv-quarantine-timeout must be "
                f"positive, got {self.transfer_timeout_s}, {self.rpc_timeout_s}, "
                f"{self.kv_quarantine_timeout_s}"
            )


class WorkerRuntime:
    def __init__(
        self,
        settings: WorkerSettings,
        engine: AsyncEngine,
        layout: KVLayout,
        transfer: TransferEngine | None,
        pools: list[KVPoolDescriptor],
        sessions: list[str],
        metrics: WorkerMetrics | None = None,
    ) -> None:
        """`pools[r]` and `sessions[r]`: where rank r's KV pool lives and its transfer session
        (one of each per data-parallel rank; none in colocated mode)."""
        if len(pools) != len(sessions):
            raise ValueError(f"{len(pools)} KV pools but {len(sessions)} transfer sessions")
        self.settings = settings
        self.engine = engine
        self.layout = layout
        self.transfer = transfer
        self.pools = pools
        self.sessions = sessions
        self.metrics = metrics
        self._channels: dict[str, grpc.aio.Channel] = {}
        # Tells a router that this is another process than the one it knew at this address.
        self.instance_id = secrets.token_hex(8)

    def channel(self, endpoint: str) -> grpc.aio.Channel:
        """A long-lived channel to a peer worker (one per endpoint)."""
        ch = self._channels.get(endpoint)
        if ch is None:
            ch = cluster_token.channel(
                endpoint, self.settings.cluster_token, tls=self.settings.cluster_tls
            )
            self._channels[endpoint] = ch
        return ch

    async def close(self) -> None:
        await asyncio.gather(*(ch.close() for ch in self._channels.values()))
        self._channels.clear()

    async def abort(self, request: common_pb2.AbortRequest) -> common_pb2.AbortResponse:
        found = await self.engine.abort(request.request_id)
        return common_pb2.AbortResponse(request_id=request.request_id, found=found)

    async def load(self, request: common_pb2.LoadRequest) -> common_pb2.LoadReport:
        """Summed over every rank, as of the engine loop's latest iteration."""
        loads = self.engine.loads
        return common_pb2.LoadReport(
            request_id=request.request_id,
            num_running=sum(x.num_running for x in loads),
            num_waiting=sum(x.num_waiting for x in loads),
            num_transferring=sum(x.num_transferring for x in loads),
            num_free_pages=sum(x.num_free_pages for x in loads),
            num_total_pages=sum(x.num_total_pages for x in loads),
            instance_id=self.instance_id,
        )

    def info(self, request: common_pb2.WorkerInfoRequest) -> common_pb2.WorkerInfo:
        e = self.engine.engine
        return common_pb2.WorkerInfo(
            request_id=request.request_id,
            role=self.settings.role,
            model=self.settings.model_name,
            context_length=e.context_length,
            vocab_size=e.model_config.vocab_size,
            layout=layout_to_proto(self.layout),
            dp_size=self.engine.world,
            session_port=self.settings.session_port,
            instance_id=self.instance_id,
        )
