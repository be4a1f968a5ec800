"""Mutual TLS inside the cluster (protos.cluster_tls) with real workers and a real router: the
whole disaggregated path works over it, on both of a worker's ports; connections without a
certificate of the cluster's CA are refused; a bad --tls-dir is one line with its fix."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import cluster_token
from protos.cluster_tls import SERVER_NAME, ClusterTls
from tests.e2e.procs import workers
from tests.router.procs import call, router_process

CERTS = Path(__file__).resolve().parents[2] / "deploy" / "certs.sh"


def make_certs(directory: Path) -> Path:
    subprocess.run(["sh", str(CERTS), str(directory)], check=True, capture_output=True)
    return directory


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the cluster's TLS dir, a TLS dir of another CA)."""
    return (
        make_certs(tmp_path_factory.mktemp("cluster-ca")),
        make_certs(tmp_path_factory.mktemp("other-ca")),
    )


@pytest.fixture(scope="module")
def cluster(
    tiny_models: dict[str, Path], certs: tuple[Path, Path]
) -> Iterator[tuple[dict[str, object], str, str]]:
    """(decode worker's ready line, prefill endpoint, decode endpoint), both over TLS."""
    model_dir = tiny_models["qwen3-moe"]
    flags = ("--tls-dir", str(certs[0]))
    with workers(model_dir, ("prefill", *flags), ("decode", *flags)) as started:
        [(_, prefill), (decode_child, decode)] = started
        yield decode_child.ready, prefill, decode


@pytest.mark.parametrize("transport", ["native", "grpcio"])
def test_router_and_workers_over_tls(
    tiny_models: dict[str, Path],
    certs: tuple[Path, Path],
    cluster: tuple[dict[str, object], str, str],
    transport: str,
) -> None:
    _, prefill, decode = cluster
    flags = ("--prefill", prefill, "--decode", decode, "--worker-transport", transport)
    with router_process(tiny_models["qwen3-moe"], *flags, "--tls-dir", str(certs[0])) as (_, url):
        body = {"model": "qwen3-moe", "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0}
        status, reply = call(url + "/v1/completions", "POST", body)
        assert status == 200, reply
        assert reply["usage"]["completion_tokens"] == 4
        status, health = call(url + "/health")
        assert status == 200, health


def test_connections_without_the_clusters_certificate_are_refused(
    certs: tuple[Path, Path], cluster: tuple[dict[str, object], str, str]
) -> None:
    ready, _, decode = cluster
    ours, other = (ClusterTls.load(str(d)) for d in certs)
    assert ours is not None and other is not None
    session_endpoint = f"127.0.0.1:{ready['session_port']}"

    async def health(channel: grpc.aio.Channel) -> int:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        return int(reply.status)

    async def handshake(endpoint: str, ctx: ssl.SSLContext | None) -> None:
        """A TLS connection to ``endpoint`` that sends a byte and reads: raises when refused."""
        host, _, port = endpoint.rpartition(":")
        reader, writer = await asyncio.open_connection(
            host, int(port), ssl=ctx, server_hostname=SERVER_NAME
        )
        try:
            writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            await writer.drain()
            if not await asyncio.wait_for(reader.read(1), 5):
                raise ConnectionResetError("closed")  # TLS 1.3 reports a refused cert late
        finally:
            writer.close()

    async def main() -> None:
        async with cluster_token.channel(decode, None, tls=ours) as ch:
            assert await health(ch) == health_pb2.HealthCheckResponse.SERVING
        for tls in (None, other):  # plain TCP, and a certificate of another CA
            async with cluster_token.channel(decode, None, tls=tls) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await health(ch)
                assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        # The session listener: our certificate gets an HTTP/2 answer; another CA's, or none,
        # ends in a failed handshake.
        await handshake(session_endpoint, ours.client_context)
        no_cert = ssl.create_default_context(cadata=ours.ca.decode())
        no_cert.set_alpn_protocols(["h2"])
        for ctx in (other.client_context, no_cert):
            with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
                await handshake(session_endpoint, ctx)

    asyncio.run(main())


@pytest.mark.parametrize("module", ["decode_worker", "router"])
def test_a_bad_tls_dir_is_one_line_with_the_fix(
    tiny_models: dict[str, Path], tmp_path: Path, module: str
) -> None:
    (tmp_path / "ca.crt").write_text("not a certificate\n")
    argv = [sys.executable, "-m", module, "--model-path", str(tiny_models["qwen3-moe"])]
    for tls_dir, expected in ((tmp_path / "none", "make certs"), (tmp_path, "make certs")):
        if tls_dir == tmp_path:  # all three files there, none of them loads
            (tmp_path / "tls.crt").write_text("not a certificate\n")
            (tmp_path / "tls.key").write_text("not a key\n")
        done = subprocess.run(
            [*argv, "--port", "0", "--tls-dir", str(tls_dir)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode != 0
        errors = [line for line in done.stderr.splitlines() if line.strip()]
        assert "Traceback" not in done.stderr, done.stderr
        assert any(expected in line and "--tls-dir" in line for line in errors), done.stderr
