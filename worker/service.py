"""What every worker's gRPC servicer has, whatever its role: its session method, served the
same on the grpcio server and on the session listener, and ``Abort``, ``GetLoad`` and
``GetInfo`` answered by the worker's runtime (``worker.runtime``; the benchmark stub's
stand-in in ``bench.stub_worker``).

A role's servicer lists ``WorkerService`` before its generated base class, so that these
methods are the ones grpcio calls, and gives ``__init__`` its session method, the function
that answers one request (``respond`` yields its replies and raises what fails it) and the
function that turns such an exception into a status (``failure``).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, Protocol

import grpc

from protos import common_pb2
from protos.contract import SessionMethod
from worker import session
from worker.session_server import Method, SessionServer


class Common(Protocol):
    """The RPCs a worker answers the same in both roles."""

    async def abort(self, request: common_pb2.AbortRequest) -> common_pb2.AbortResponse: ...

    async def load(self, request: common_pb2.LoadRequest) -> common_pb2.LoadReport: ...

    def info(self, request: common_pb2.WorkerInfoRequest) -> common_pb2.WorkerInfo: ...


class WorkerService:
    def __init__(
        self,
        common: Common,
        method: SessionMethod[Any, Any],
        respond: Callable[[Any], AsyncIterator[Any]],
        failure: session.Failure,
    ) -> None:
        self.common = common
        self.session_method = method
        self._respond = respond
        self._failure = failure

    def serve_session(self, frames: AsyncIterator[Any]) -> AsyncGenerator[Any, None]:
        """The reply frames of one session, on either server."""
        return session.serve(frames, self._respond, self._failure, self.session_method)

    async def Session(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        # grpc.aio takes a streaming handler only as an async generator function.
        async for frame in self.serve_session(request_iterator):
            yield frame

    async def Abort(
        self, request: common_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.AbortResponse:
        return await self.common.abort(request)

    async def GetLoad(
        self, request: common_pb2.LoadRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.LoadReport:
        return await self.common.load(request)

    async def GetInfo(
        self, request: common_pb2.WorkerInfoRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.WorkerInfo:
        return self.common.info(request)


def add_service(service: WorkerService, server: grpc.aio.Server, sessions: SessionServer) -> str:
    """Serve ``service`` on the grpcio server and its session method on the listener; returns
    the service's name (for grpc.health.v1)."""
    method = service.session_method
    method.add_servicer(service, server)
    sessions.add(method.path, Method(method.parse_request, service.serve_session))
    return method.service
