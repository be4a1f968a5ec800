"""Mutual TLS on every connection inside the cluster: router -> workers, worker -> worker,
controller -> workers.

With ``--tls-dir DIR`` (or ``PDSERVE_TLS_DIR``) on the router, every worker and the
controller, each one serves its gRPC port and its session listener over TLS, asks every peer
for a certificate, and connects to peers with its own. ``DIR`` holds ``ca.crt``, ``tls.crt``
and ``tls.key``: the keys of a Kubernetes TLS secret with the CA added (what cert-manager
writes), or what ``make certs`` writes for a local CA (``deploy/certs.sh``).

Identity is the cluster CA: a peer is trusted when its certificate chains to ``ca.crt``.
Workers move between hosts and addresses, so certificates are not checked against the
address dialled but against one name, ``SERVER_NAME``, that every certificate of the cluster
carries in its subject alternative names. Whoever holds a key signed by the cluster CA is
inside the cluster; keep the CA's key out of the cluster (README: threat model).

The cluster token (``cluster_token``) still applies on top, when set. Health checks over TLS
need a client certificate like any other call, so Kubernetes' plain gRPC probes cannot reach a
worker that has ``--tls-dir``: the manifests' probes then use the HTTP metrics port instead.
"""

from __future__ import annotations

import functools
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

ENV = "PDSERVE_TLS_DIR"
SERVER_NAME = "pdserve-cluster"  # the name every certificate of the cluster carries
CA, CERT, KEY = "ca.crt", "tls.crt", "tls.key"
ALPN = ["h2"]  # gRPC is HTTP/2; gRPC servers refuse TLS connections that do not negotiate it


@dataclass(frozen=True)
class ClusterTls:
    """The cluster CA and this process's certificate and key, read once at start-up."""

    directory: Path
    ca: bytes
    cert: bytes
    key: bytes

    @classmethod
    def load(cls, tls_dir: str | None = None) -> ClusterTls | None:
        """From ``tls_dir`` or ``PDSERVE_TLS_DIR``; None when neither is set (plain TCP).
        ValueError with the fix in one line when a file is missing or does not load."""
        where = tls_dir or os.environ.get(ENV)
        if not where:
            return None
        directory = Path(where)
        missing = [n for n in (CA, CERT, KEY) if not (directory / n).is_file()]
        if missing:
            raise ValueError(
                f"--tls-dir {where!r} lacks {', '.join(missing)}: it needs {CA}, {CERT} and "
                f"{KEY} (`make certs CERTS_DIR={where}` writes them for a local CA)"
            )
        tls = cls(
            directory,
            (directory / CA).read_bytes(),
            (directory / CERT).read_bytes(),
            (directory / KEY).read_bytes(),
        )
        try:  # fail at start-up, not on the first connection
            tls.server_context  # noqa: B018 (built now to fail at start-up)
            tls.client_context  # noqa: B018
        except ssl.SSLError as exc:
            raise ValueError(
                f"--tls-dir {where!r}: the certificate, key or CA does not load ({exc.reason}); "
                f"regenerate them with `make certs CERTS_DIR={where}`"
            ) from None
        return tls

    # -- grpcio ---------------------------------------------------------------------------------

    def server_credentials(self) -> grpc.ServerCredentials:
        """For ``server.add_secure_port``: clients must present a certificate of the CA."""
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=True
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )

    @staticmethod
    def channel_options() -> list[tuple[str, Any]]:
        """Check the server's certificate against the cluster's name, not the address."""
        return [("grpc.ssl_target_name_override", SERVER_NAME)]

    # -- asyncio (the session listener and the router's own gRPC client) ------------------------

    @functools.cached_property
    def server_context(self) -> ssl.SSLContext:
        """One context for every connection (it holds the key pair, read once)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._common(ctx)
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    @functools.cached_property
    def client_context(self) -> ssl.SSLContext:
        """Connect with ``server_hostname=SERVER_NAME``; one context for every connection."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the name
        self._common(ctx)
        return ctx

    def _common(self, ctx: ssl.SSLContext) -> None:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cadata=self.ca.decode())
        # The ssl module reads a key pair only from files.
        ctx.load_cert_chain(self.directory / CERT, self.directory / KEY)
        ctx.set_alpn_protocols(ALPN)
