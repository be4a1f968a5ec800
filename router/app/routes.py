"""What an HTTP handler sees and returns, and the route table that picks it.

A handler takes a ``Request`` and the ``router.app.http.Connection`` it came on, and returns a
whole ``Response`` or an ``EventStream`` (chunked, written as it goes). ``Routes`` maps a
method and path (``{name}`` segments match one segment each) to a handler.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from router.app.http import Connection


class Request:
    """One parsed request: ``headers`` by lower-case name (repeats joined by ``", "``),
    ``params`` the path's ``{name}`` segments (filled in by ``Routes.resolve``)."""

    __slots__ = (
        "body", "headers", "http_1_0", "keep_alive", "method", "params", "path", "query",
        "target",
    )  # fmt: skip

    def __init__(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes,
        keep_alive: bool = True,
        http_1_0: bool = False,
    ) -> None:
        self.method = method
        self.target = target  # path and query, as sent (origin form)
        path, _, self.query = target.partition("?")
        self.path = path
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive  # the connection stays open after the reply
        self.http_1_0 = http_1_0
        self.params: dict[str, str] = {}


class Response:
    """A whole reply: ``body`` goes out with a ``Content-Length``."""

    __slots__ = ("body", "content_type", "headers", "status")
    outcome: int | None = None  # as for an EventStream: the status is the outcome

    def __init__(
        self,
        body: bytes,
        status: int = 200,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.body = body
        self.status = status
        self.content_type = content_type
        self.headers = headers


class EventStream:
    """A streamed reply (``Transfer-Encoding: chunked``): the head goes out with the first
    ``write``; ``write`` waits while the client reads slower than we write, and raises
    ``ConnectionResetError`` once the client is gone. ``outcome``: the status to account
    when an error or a disconnect came after the 200 went out."""

    __slots__ = ("_chunked", "_conn", "_head", "_started", "ended", "outcome", "status")

    def __init__(self, conn: Connection, head: bytes, chunked: bool = True) -> None:
        self._conn = conn
        self._head = head
        self._chunked = chunked  # else the body goes as it is and the connection closes
        self._started = False
        self.ended = False
        self.status = 200
        self.outcome: int | None = None

    async def write(self, data: bytes) -> None:
        if not data:
            return
        frame = b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data
        if not self._started:
            self._started = True
            frame = self._head + frame
        await self._conn.send(frame)

    async def end(self) -> None:
        if self.ended:
            return
        self.ended = True
        tail = b"0\r\n\r\n" if self._chunked else b""
        if not self._started:
            self._started = True
            tail = self._head + tail
        if tail:
            await self._conn.send(tail)


Reply = Response | EventStream
App = Callable[[Request, "Connection"], Awaitable[Reply]]
ErrorReply = Callable[[int, str], Response]


class Routes:
    """Handlers by method and path; a path segment ``{name}`` matches one segment."""

    def __init__(self) -> None:
        self._exact: dict[str, dict[str, Any]] = {}  # path -> method -> handler
        self._patterns: list[tuple[str, tuple[str, ...], dict[str, Any]]] = []

    def add(self, method: str, path: str, handler: Any) -> None:
        if "{" not in path:
            self._exact.setdefault(path, {})[method] = handler
            return
        parts = tuple(path.strip("/").split("/"))
        for _path, existing, methods in self._patterns:
            if existing == parts:
                methods[method] = handler
                return
        self._patterns.append((path, parts, {method: handler}))

    def resolve(self, request: Request) -> tuple[str, Any]:
        """``(route, handler)`` for the request (its ``params`` filled in); raises
        ``NoRoute`` (404, or 405 with the methods allowed)."""
        methods = self._exact.get(request.path)
        route = request.path
        if methods is None:
            segments = request.path.strip("/").split("/")
            for template, parts, candidates in self._patterns:
                if len(parts) == len(segments) and all(
                    p == s or (p[0] == "{" and s) for p, s in zip(parts, segments, strict=True)
                ):
                    request.params = {
                        p[1:-1]: s for p, s in zip(parts, segments, strict=True) if p[0] == "{"
                    }
                    methods, route = candidates, template
                    break
            else:
                raise NoRoute(404, ())
        handler = methods.get(request.method)
        if handler is None:
            raise NoRoute(405, tuple(methods))
        return route, handler


class NoRoute(Exception):
    def __init__(self, status: int, allowed: tuple[str, ...]) -> None:
        super().__init__(status)
        self.status = status
        self.allowed = allowed
