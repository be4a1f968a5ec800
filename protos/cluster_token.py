"""A shared token on every call inside the cluster: router -> workers and worker -> worker.

Without it, anyone who can reach a worker's port can run prefill or decode on it, write
destinations, or abort other clients' requests. With ``PDSERVE_CLUSTER_TOKEN`` (or
``--cluster-token-file``) set on the router and every worker, each call carries the token in
the ``x-pdserve-token`` metadata and the workers refuse calls without it (UNAUTHENTICATED),
on the grpcio server (``TokenServerInterceptor``) and on the session listener
(``worker.session_server``). ``grpc.health.v1`` stays open for probes. The token is
compared in constant time. It authenticates; it does not encrypt: on a network others can
read, add mutual TLS (``protos.cluster_tls``, ``--tls-dir``) or keep the cluster on a private
network (README: threat model).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from protos.cluster_tls import ClusterTls

ENV = "PDSERVE_CLUSTER_TOKEN"
METADATA_KEY = "x-pdserve-token"
OPEN_PREFIX = "/grpc.health.v1.Health/"  # probes need no token
REFUSED = "missing or wrong cluster token (set PDSERVE_CLUSTER_TOKEN alike on every process)"


def load(token_file: str | None = None) -> str | None:
    """The token from ``token_file`` (its first line) or ``PDSERVE_CLUSTER_TOKEN``; None when
    neither is set. ValueError naming the file when it cannot be read or is empty."""
    if token_file:
        try:
            lines = Path(token_file).read_text().split()
        except OSError as exc:
            raise ValueError(
                f"cannot read --cluster-token-file {token_file!r}: {exc.strerror}"
            ) from None
        if not lines:
            raise ValueError(f"--cluster-token-file {token_file!r} is empty")
        return lines[0]
    return os.environ.get(ENV) or None


class TokenCheck:
    """Constant-time comparison against the token (compared as SHA-256 digests)."""

    def __init__(self, token: str) -> None:
        self._digest = hashlib.sha256(token.encode()).digest()

    def ok(self, given: str | None) -> bool:
        return hmac.compare_digest(hashlib.sha256((given or "").encode()).digest(), self._digest)


class TokenServerInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call but health checks whose metadata lacks the token."""

    def __init__(self, token: str) -> None:
        self._check = TokenCheck(token)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIX):
            return handler
        given = next((v for k, v in details.invocation_metadata or () if k == METADATA_KEY), None)
        if self._check.ok(given if isinstance(given, str) else None):
            return handler
        return _refusing(handler)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that answers UNAUTHENTICATED."""

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSED)

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSED)
        yield  # unreachable: makes this an async generator, as streaming handlers are

    make: Any
    if handler.response_streaming:
        make = (
            grpc.stream_stream_rpc_method_handler
            if handler.request_streaming
            else grpc.unary_stream_rpc_method_handler
        )
        fn: Any = streaming
    else:
        make = (
            grpc.stream_unary_rpc_method_handler
            if handler.request_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        fn = unary
    return make(
        fn,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _with_token(details: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata.add(METADATA_KEY, token)
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _AddsToken:
    def __init__(self, token: str) -> None:
        self._token = token


# One class per call shape: grpc.aio files each interceptor under the first shape it is an
# instance of, so one class for all four would see unary-unary calls only.
class _UnaryUnary(_AddsToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_token(details, self._token), request)


class _UnaryStream(_AddsToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_token(details, self._token), request)


class _StreamUnary(_AddsToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_with_token(details, self._token), requests)


class _StreamStream(_AddsToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_with_token(details, self._token), requests)


def client_interceptors(token: str | None) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors that add ``token`` to every call of a channel, whatever its shape."""
    if token is None:
        return []
    return [_UnaryUnary(token), _UnaryStream(token), _StreamUnary(token), _StreamStream(token)]


def channel(
    target: str,
    token: str | None,
    options: list[tuple[str, Any]] | None = None,
    tls: ClusterTls | None = None,
) -> grpc.aio.Channel:
    """A channel whose calls carry ``token`` (none: no token), over mutual TLS with ``tls``
    (``protos.cluster_tls``; none: plain TCP)."""
    interceptors = client_interceptors(token) or None
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(
        target,
        tls.channel_credentials(),
        options=[*(options or ()), *tls.channel_options()],
        interceptors=interceptors,
    )


def server_interceptors(token: str | None) -> list[grpc.aio.ServerInterceptor]:
    return [] if token is None else [TokenServerInterceptor(token)]
