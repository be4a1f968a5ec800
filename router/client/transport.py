"""How the router opens a worker's session stream (``--worker-transport``).

``native`` (the default): the router's own gRPC client (``router.client.grpc_stream``) to the
worker's session listener, on the host the router knows the worker by and the port the worker
reported in ``GetInfo``. When a session never reached the listener (a worker restarted on a
pinned ``--port`` gets a new listener port), the next one goes to the worker's main port,
which serves sessions too, while ``GetInfo`` is asked where the listener is now. ``grpcio``:
grpc.aio on the worker's channel.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from protos.cluster_tls import ClusterTls
from protos.contract import SessionMethod
from router.client.grpc_stream import StreamCall

log = logging.getLogger(__name__)


class SessionOpener:
    """Opens the session calls of one worker, one at a time (a new one once the last broke).

    ``grpcio_call`` opens the method on the worker's grpc.aio channel; ``listener_port`` asks
    the worker (GetInfo) for its listener's port, waiting up to the seconds it is given.
    """

    def __init__(
        self,
        endpoint: str,
        kind: SessionMethod[Any, Any],
        transport: str,
        keepalive_s: float,
        token: str | None,
        tls: ClusterTls | None,
        grpcio_call: Callable[[], Any],
        listener_port: Callable[[float], Awaitable[int]],
    ) -> None:
        self.endpoint = endpoint
        self.kind = kind
        self.session_port = 0  # the worker's listener; 0: sessions on the main port
        self._transport = transport
        self._keepalive_s = keepalive_s
        self._token = token
        self._tls = tls
        self._grpcio_call = grpcio_call
        self._listener_port = listener_port
        self._call: Any = None  # the last call opened
        self._listener_unreachable = False  # open sessions on the main port until GetInfo
        self._refresh: asyncio.Future[None] | None = None  # that GetInfo

    @property
    def session_endpoint(self) -> str:
        """Where the native transport opens sessions: the worker's session listener, on the
        host the router knows the worker by; or its main port, which serves sessions too,
        when it has none or the listener could not be reached."""
        if not self.session_port or self._listener_unreachable:
            return self.endpoint
        return f"{self.endpoint.rpartition(':')[0]}:{self.session_port}"

    def open(self) -> Any:
        """A new session call (the last one broke, or none was opened yet)."""
        call = self._call
        if isinstance(call, StreamCall) and not call.reached and self._refresh is None:
            # The worker may have restarted with its listener on another port: carry on
            # over the main port and ask GetInfo where the listener is now.
            self._listener_unreachable = call.endpoint != self.endpoint
            self._refresh = asyncio.ensure_future(self._find_listener())
        if self._transport == "native":
            call = StreamCall(
                self.session_endpoint, self.kind.path, self.kind.parse_reply, self._keepalive_s,
                token=self._token, tls=self._tls,
            )  # fmt: skip
        else:
            call = self._grpcio_call()
        self._call = call
        return call

    async def _find_listener(self) -> None:
        try:
            port = await self._listener_port(5.0)
        except grpc.aio.AioRpcError as exc:
            log.debug("GetInfo on %s: %s", self.endpoint, exc.code().name)
        else:
            if port != self.session_port:
                log.info("worker %s: session listener now on port %d", self.endpoint, port)
                self.session_port = port
            self._listener_unreachable = False
        finally:
            self._refresh = None

    def close(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
