"""The Ray controller: places a spec's processes, supervises them, scales and tears down.

One detached actor (`pdserve-controller` in namespace `pdserve`) owns the cluster:

- Redis (embedded: a `redis-server` actor; or the spec's address) is the worker registry;
- each prefill replica is one actor (Ray's SPREAD strategy puts replicas on different nodes);
- each decode instance is N actors, one per rank, in one STRICT_PACK placement group (one
  node, as its all-to-alls need), each bundle holding one device (`CPU`, `GPU`, or the custom
  `NPU` resource of Ascend nodes);
- the router actor finds workers through Redis.

Supervision: a worker process that dies takes its actor with it and Ray restarts the actor
(`max_restarts`), which starts a fresh worker that registers itself again. A decode instance
with a dead or unhealthy rank is restarted as a whole group. A worker whose health check keeps
failing (hung) is killed so that Ray restarts it. The router retries and migrates the
requests that were in flight.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import ray
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster import metrics
from cluster.actors import ProcessHost, node_address, redis_argv
from cluster.spec import EMBEDDED, ClusterSpec
from protos import cluster_token
from protos.cluster_tls import ClusterTls

log = logging.getLogger(__name__)

NAMESPACE = "pdserve"
CONTROLLER = "pdserve-controller"
_DEVICE_FLAG = {"CPU": "cpu", "GPU": "cuda", "NPU": "npu"}
_HEALTH_FAILURES_BEFORE_RESTART = 3
_SUPERVISE_INTERVAL_S = 1.0

Host: Any = ray.remote(ProcessHost)


def _bundle(device: str, ray_resource: str = "") -> dict[str, float]:
    bundle = {"CPU": 1.0} if device == "CPU" else {"CPU": 1.0, device: 1.0}
    if ray_resource:
        bundle[ray_resource] = 1.0
    return bundle


def _worker_options(device: str, ray_resource: str = "") -> dict[str, Any]:
    """Ray options of one worker process (or rank) on `device`: Ray takes GPUs only as
    `num_gpus`, other devices (NPU) and the spec's `ray_resource` as custom resources."""
    resources = {device: 1.0} if device not in ("CPU", "GPU") else {}
    if ray_resource:
        resources[ray_resource] = 1.0
    return {"num_cpus": 1, "num_gpus": 1 if device == "GPU" else 0, "resources": resources}


@dataclass
class Group:
    """One supervised unit: a prefill replica, a decode instance (its ranks), or the router."""

    name: str
    role: str  # prefill | decode | null | router | redis
    actors: list[Any] = field(default_factory=list)
    pg: PlacementGroup | None = None
    info: dict[str, Any] = field(default_factory=dict)
    restarts: int = 0
    health_failures: int = 0
    healthy: bool = False
    draining: bool = False
    down_since: float | None = None
    last_recovery_s: float | None = None

    @property
    def endpoint(self) -> str:
        return str(self.info.get("endpoint", ""))


class Controller:
    def __init__(self, spec: dict[str, Any], model_path: str, log_dir: str) -> None:
        logging.basicConfig(level=logging.INFO)
        self.spec = ClusterSpec.from_dict(spec)
        self.model_path = model_path
        self.log_dir = log_dir
        self.redis_url = "" if self.spec.redis == EMBEDDED else self.spec.redis
        self.groups: dict[str, Group] = {}
        self._counter = {"prefill": 0, "decode": 0}
        self._supervisor: asyncio.Task[None] | None = None
        self._metrics: web.AppRunner | None = None
        self.router_url = ""
        # Health checks speak mutual TLS when the cluster does (PDSERVE_TLS_DIR on every node).
        self._tls = ClusterTls.load()

    # -- bringing things up -----------------------------------------------------------------

    def _worker_argv(self, module: str, mode: str, device: str, *extra: str) -> list[str]:
        m = self.spec.model
        return ["-m", module, "--disaggregation-mode", mode, "--model-path", self.model_path,
                "--load-format", m.load_format, "--device", _DEVICE_FLAG[device],
                "--host", "{node_ip}", "--port", "0", "--registry", self.redis_url,
                *m.engine_args, *extra]  # fmt: skip

    async def up(self) -> dict[str, Any]:
        if self.spec.redis == EMBEDDED:
            ip, port = await ray.remote(node_address).options(num_cpus=0).remote()
            redis = Group("redis", "redis")
            redis.actors = [
                Host.options(num_cpus=0, max_restarts=-1).remote(
                    "redis",
                    redis_argv(ip, port, "/tmp", secrets.token_hex(16)),
                    self.log_dir,
                    ready="redis",
                    python=False,
                )
            ]
            redis.info = await redis.actors[0].info.remote()
            redis.healthy = True
            self.redis_url = str(redis.info["url"])
            self.groups["redis"] = redis
        await asyncio.gather(
            *(self._add("prefill") for _ in range(self.spec.prefill.replicas)),
            *(self._add("decode") for _ in range(self.spec.decode.instances)),
        )
        if self.spec.router.enabled:
            await self._start_router()
        self._supervisor = asyncio.create_task(self._supervise())
        if self.spec.metrics.port:
            self._metrics = await metrics.serve(
                self._samples, self.spec.metrics.host, self.spec.metrics.port
            )
        return {"url": self.router_url, "redis": self.redis_url}

    async def _start_router(self) -> None:
        r = self.spec.router
        argv = ["-m", "router", "--model-path", self.model_path, "--host", r.host,
                "--port", str(r.port), "--registry", self.redis_url, *r.args]  # fmt: skip
        group = Group("router", "router")
        group.actors = [
            Host.options(num_cpus=0, max_restarts=-1).remote("router", argv, self.log_dir)
        ]
        group.info = await group.actors[0].info.remote()
        self.router_url = str(group.info["url"])
        group.healthy = True
        self.groups["router"] = group

    async def _add(self, role: str) -> Group:
        index = self._counter[role]
        self._counter[role] += 1
        group = Group(f"{role}-{index}", role if role == "prefill" or not self.spec.colocated
                      else "null")  # fmt: skip
        self.groups[group.name] = group
        await (self._start_prefill(group) if role == "prefill" else self._start_decode(group))
        return group

    async def _start_prefill(self, group: Group) -> None:
        device = self.spec.prefill.device
        argv = self._worker_argv("prefill_worker", "prefill", device)
        actor = Host.options(
            **_worker_options(device, self.spec.prefill.ray_resource),
            scheduling_strategy="SPREAD",
            max_restarts=-1,
        ).remote(group.name, argv, self.log_dir)
        group.actors = [actor]
        group.info = await actor.info.remote()
        group.healthy = True

    async def _start_decode(self, group: Group) -> None:
        d = self.spec.decode
        if group.pg is None:
            bundle = _bundle(d.device, d.ray_resource)
            group.pg = placement_group([bundle] * d.ep_size, strategy="STRICT_PACK")
            await group.pg.ready()
        pg = group.pg

        def in_bundle(i: int) -> PlacementGroupSchedulingStrategy:
            return PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)

        mode = group.role
        ep = ["--ep-size", str(d.ep_size), "--ep-num-redundant-experts",
              str(d.num_redundant_experts)]  # fmt: skip
        if d.ep_size == 1:
            argvs = [self._worker_argv("decode_worker", mode, d.device, *ep)]
        else:
            ip, port = (
                await ray.remote(node_address)
                .options(num_cpus=0, scheduling_strategy=in_bundle(0))
                .remote()
            )
            master = f"{ip}:{port}"
            rank0 = self._worker_argv("decode_worker", mode, d.device, *ep,
                                      "--dist-init-addr", master)  # fmt: skip
            rest = [
                ["-m", "decode_worker.ranks", "--rank", str(r), "--master", master,
                 *self._worker_argv("decode_worker", mode, d.device, *ep)[2:]]
                for r in range(1, d.ep_size)
            ]  # fmt: skip
            argvs = [rank0, *rest]
        options = _worker_options(d.device, d.ray_resource)
        # A rank's death is handled by restarting the whole instance, not one actor.
        group.actors = [
            Host.options(**options, scheduling_strategy=in_bundle(i), max_restarts=0).remote(
                f"{group.name}-rank{i}", argv, self.log_dir, ready="line" if i == 0 else "none"
            )
            for i, argv in enumerate(argvs)
        ]
        group.info = await group.actors[0].info.remote()
        group.healthy = True

    # -- supervision ------------------------------------------------------------------------

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(_SUPERVISE_INTERVAL_S)
            for group in list(self.groups.values()):
                if group.draining or group.role in ("redis", "router"):
                    continue
                try:
                    await self._check(group)
                except Exception:
                    log.exception("supervising %s failed", group.name)

    async def _check(self, group: Group) -> None:
        try:
            infos = await asyncio.wait_for(
                asyncio.gather(*(a.info.remote() for a in group.actors)), timeout=30
            )
        except (ray.exceptions.RayActorError, asyncio.TimeoutError):
            infos = None
        if infos is not None and infos[0].get("pid") != group.info.get("pid"):
            # Ray restarted the actor (its process had died): a new worker, a new endpoint.
            self._recovered(group, infos[0])
            return
        alive = infos is not None and all(i["alive"] for i in infos)
        healthy = alive and await _serving(group.endpoint, self._tls)
        if healthy:
            if group.down_since is not None:
                self._recovered(group, infos[0] if infos else group.info)
            group.health_failures = 0
            return
        group.healthy = False
        group.down_since = group.down_since or time.monotonic()
        group.health_failures += 1
        if group.role == "prefill":
            if group.health_failures >= _HEALTH_FAILURES_BEFORE_RESTART and infos is not None:
                log.warning("%s is hung; restarting it", group.name)
                ray.kill(group.actors[0], no_restart=False)
            return
        # A decode instance: any dead rank, or a rank 0 that says NOT_SERVING, restarts all.
        if infos is None or not alive or group.health_failures >= _HEALTH_FAILURES_BEFORE_RESTART:
            log.warning("%s lost a rank or its health; restarting the instance", group.name)
            for actor in group.actors:
                ray.kill(actor, no_restart=True)
            await self._start_decode(group)
            self._recovered(group, group.info)

    def _recovered(self, group: Group, info: dict[str, Any]) -> None:
        group.info = info
        group.restarts += 1
        group.healthy = True
        group.health_failures = 0
        if group.down_since is not None:
            group.last_recovery_s = time.monotonic() - group.down_since
        group.down_since = None
        log.info("%s serves again at %s (restart %d)", group.name, group.endpoint, group.restarts)

    # -- operating --------------------------------------------------------------------------

    def _samples(self) -> list[metrics.GroupSample]:
        """Every group as the controller's /metrics and /targets report it."""
        out = []
        for g in self.groups.values():
            url = str(g.info.get("metrics", ""))
            if g.role == "router" and g.info.get("url"):
                url = str(g.info["url"]) + "/metrics"
            # A server bound to every address is scraped at its node's.
            url = url.replace("//0.0.0.0:", f"//{g.info.get('node', '127.0.0.1')}:")
            out.append(metrics.GroupSample(g.name, g.role, g.restarts, g.healthy, g.draining, url))
        return out

    async def status(self) -> list[dict[str, Any]]:
        rows = []
        for g in self.groups.values():
            rows.append({
                "name": g.name, "role": g.role, "node": g.info.get("node", ""),
                "endpoint": g.endpoint or g.info.get("url", ""), "ranks": len(g.actors),
                "health": "draining" if g.draining else ("ok" if g.healthy else "down"),
                "restarts": g.restarts, "last_recovery_s": g.last_recovery_s,
            })  # fmt: skip
        return rows

    async def scale(self, prefill: int | None, decode: int | None) -> list[dict[str, Any]]:
        """Add replicas/instances, or drain the newest ones (they finish what they have)."""
        for role, want in (("prefill", prefill), ("decode", decode)):
            if want is None:
                continue
            live = [g for g in self.groups.values()
                    if g.name.startswith(role + "-") and not g.draining]  # fmt: skip
            if want < (0 if role == "prefill" else 1):
                raise ValueError(f"cannot scale {role} to {want}")
            await asyncio.gather(*(self._add(role) for _ in range(want - len(live))))
            await asyncio.gather(*(self._drain(g) for g in live[want:]))
        return await self.status()

    async def _drain(self, group: Group) -> None:
        group.draining = True
        # SIGTERM: the worker reports NOT_SERVING and draining in Redis, finishes its requests.
        await asyncio.gather(*(a.stop.remote() for a in group.actors), return_exceptions=True)
        for actor in group.actors:
            ray.kill(actor, no_restart=True)
        if group.pg is not None:
            remove_placement_group(group.pg)
        del self.groups[group.name]

    async def down(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
        if self._metrics is not None:
            await self._metrics.cleanup()
        # The router first (no new requests), then every worker group at once (each drains
        # its own requests), Redis last (the workers deregister on the way out).
        tier = {"router": 0, "redis": 2}
        groups = list(self.groups.values())
        for t in range(3):
            await asyncio.gather(*(self._drain(g) for g in groups if tier.get(g.role, 1) == t))


async def _serving(endpoint: str, tls: ClusterTls | None) -> bool:
    if not endpoint:
        return False
    try:
        async with cluster_token.channel(endpoint, None, tls=tls) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=2
            )
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.aio.AioRpcError:
        return False
