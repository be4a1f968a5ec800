"""The router's HTTP/1.1 server: keep-alive connections on asyncio, requests parsed by
httptools (llhttp, the parser Node.js uses).

A framework would cost the router more per request than its own work on a request does
(aiohttp's request/response objects, middleware chain and header multidicts: about 30 µs of a
2-core machine's time per request). This server does what the router needs and no more: one
``App`` callable per request, a whole ``Response`` or a chunked ``EventStream`` back,
pipelined requests answered in order, and the contract every handler relies on:

- a client that goes away cancels its request's handler (the router then aborts the
  request on its workers);
- a body over ``max_body_bytes`` is a 413 before it is read (``Expect: 100-continue`` gets
  the 413 instead of the ``100 Continue``), a request line and headers over
  ``max_header_bytes`` a 431 before they are kept; bytes that are not HTTP are a 400, a version
  other than 1.0 and 1.1 a 505; each closes the connection after the requests before it are
  answered, and a ``100 Continue`` goes out only when its request is next to be answered;
- an HTTP/1.0 client gets a streamed reply unchunked, ended by closing the connection;
- an idle keep-alive connection closes after ``keepalive_s``;
- ``close`` stops listening, lets the requests in flight finish for ``grace_s``, then closes
  every connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from http import HTTPStatus

import httptools

from router.app.routes import App, ErrorReply, EventStream, Request, Response

log = logging.getLogger(__name__)

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
# The request line and headers together; more is a 431 before any is kept (the parser itself
# caps nothing). Servers in front of APIs take 8-64 KiB (nginx 32, aiohttp 8 per field).
DEFAULT_MAX_HEADER_BYTES = 64 << 10
_PIPELINED = 8  # requests a connection may have waiting before we stop reading it


class HttpServer:
    """Serves ``app`` on TCP and Unix sockets."""

    def __init__(
        self,
        app: App,
        error_reply: ErrorReply,
        max_body_bytes: int,
        keepalive_s: float = 75.0,
        on_traffic: Callable[[], None] | None = None,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    ) -> None:
        self.app = app
        self.error_reply = error_reply
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes
        self.keepalive_s = keepalive_s
        # Called when a request's bytes arrive and when reply bytes go out (busy polling).
        self.on_traffic = on_traffic
        self.connections: set[Connection] = set()
        self._servers: list[asyncio.Server] = []
        self._date = b""
        self._date_at = 0
        self._sweeper: asyncio.Task[None] | None = None

    def date(self) -> bytes:
        """The ``Date`` header line, formatted once a second."""
        now = int(time.time())
        if now != self._date_at:
            self._date_at = now
            self._date = b"Date: " + email.utils.formatdate(now, usegmt=True).encode() + b"\r\n"
        return self._date

    async def listen_tcp(self, host: str, port: int, reuse_port: bool = False) -> int:
        """Listen on ``host:port`` (0: any free port); returns the port."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: Connection(self), host, port, reuse_port=reuse_port or None, backlog=1024
        )
        self._started(server)
        return int(server.sockets[0].getsockname()[1])

    async def listen_unix(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        loop = asyncio.get_running_loop()
        self._started(await loop.create_unix_server(lambda: Connection(self), path))

    def _started(self, server: asyncio.Server) -> None:
        self._servers.append(server)
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._close_idle_forever())

    async def _close_idle_forever(self) -> None:
        while True:
            await asyncio.sleep(min(self.keepalive_s, 10.0))
            deadline = time.monotonic() - self.keepalive_s
            for conn in list(self.connections):
                if conn.idle_since is not None and conn.idle_since < deadline:
                    conn.close()

    async def close(self, grace_s: float = 10.0) -> None:
        """Stop listening; requests in flight get ``grace_s`` to finish, then every
        connection closes (cancelling what still runs)."""
        for server in self._servers:
            server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        deadline = time.monotonic() + grace_s
        while any(c.busy for c in self.connections) and time.monotonic() < deadline:
            for conn in [c for c in self.connections if not c.busy]:
                conn.close()
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()


class Connection(asyncio.Protocol):
    """One client connection: parses requests and answers them in order."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.loop = asyncio.get_running_loop()
        # pipelined requests waiting their turn; a Response last: the error that ends them
        self.pending: deque[Request | Response] = deque()
        self.task: asyncio.Task[None] | None = None  # the request being answered
        self.idle_since: float | None = time.monotonic()
        self.closing = False  # the reply being written is the connection's last
        self._http_1_0 = False  # the request being answered is HTTP/1.0
        self._last_read = False  # nothing after the requests in hand is read or answered
        self._continue_due = False  # a ``100 Continue`` waits for its request's turn
        self._write_ready: asyncio.Future[None] | None = None  # set while the peer is slow
        # the message being parsed
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._body_size = 0
        self._header_size = 0
        self._too_large = False
        self._keep_alive = True
        self._version_1_0 = False

    @property
    def busy(self) -> bool:
        return self.task is not None

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self.server.on_traffic is not None:
            self.server.on_traffic()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reject(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            if not self._too_large:
                self._reject(400, f"malformed HTTP request: {exc}")

    # No eof_received: a client that shuts its side down has gone away (the transport
    # closes, and connection_lost cancels what it asked), as most HTTP servers take it.

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.pending.clear()
        if self.task is not None:
            self.task.cancel()  # the client went away: the handler stops
        self.transport = None
        self.resume_writing()  # a writer waiting on a slow client finds it gone

    def pause_writing(self) -> None:
        if self._write_ready is None:
            self._write_ready = self.loop.create_future()

    def resume_writing(self) -> None:
        waiter, self._write_ready = self._write_ready, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- httptools callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._body = []
        self._body_size = 0
        self._header_size = 0

    def _count_header_bytes(self, n: int) -> bool:
        """Count the head's bytes; False (and a 431) once they pass the limit."""
        if self._last_read:
            return False
        self._header_size += n
        if self._header_size > self.server.max_header_bytes:
            self._too_large = True
            self._reject(
                431,
                f"request line and headers exceed the limit of {self.server.max_header_bytes} "
                "bytes",
            )
            return False
        return True

    def on_url(self, url: bytes) -> None:
        if self._count_header_bytes(len(url)):
            self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._count_header_bytes(len(name) + len(value) + 4):
            return
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        old = self._headers.get(key)
        self._headers[key] = text if old is None else f"{old}, {text}"

    def on_headers_complete(self) -> None:
        if self._last_read:
            return
        self._keep_alive = self.parser.should_keep_alive()
        version = self.parser.get_http_version()
        if version != "1.1" and version != "1.0":
            self._reject(505, f"HTTP/{version} is not supported; this server speaks HTTP/1.1")
            return
        self._version_1_0 = version == "1.0"
        if not self._version_1_0 and "host" not in self._headers:
            self._reject(400, "an HTTP/1.1 request must have a Host header")
            return
        length = self._headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.server.max_body_bytes:
            self._refuse_body()
            return
        expect = self._headers.get("expect")
        if expect is not None and "100-continue" in expect.lower():
            if self.task is None and not self.pending:
                self._continue()
            else:
                self._continue_due = True  # after the replies to the requests before it

    def on_body(self, body: bytes) -> None:
        if self._last_read:
            return  # refused already (431, 413 or a bad request before this one)
        self._body_size += len(body)
        if self._body_size > self.server.max_body_bytes:
            self._refuse_body()
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._too_large or self._last_read:
            return
        self._continue_due = False  # the body came without it
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        url = self._url if self._url[:1] != b"h" else _origin_form(self._url)
        request = Request(
            self.parser.get_method().decode(), url.decode("latin-1"), self._headers, body,
            self._keep_alive, self._version_1_0,
        )  # fmt: skip
        if not self._keep_alive:
            self._read_no_more()  # what comes after it is not answered
        if self.task is None:
            self._start(request)
        else:
            self.pending.append(request)
            if len(self.pending) > _PIPELINED and self.transport is not None:
                self.transport.pause_reading()  # a client pipelining ahead of its replies

    # -- answering -----------------------------------------------------------------------------

    def _start(self, request: Request) -> None:
        self.idle_since = None
        self.closing = not request.keep_alive
        self._http_1_0 = request.http_1_0
        self.task = self.loop.create_task(self._answer(request))

    async def _answer(self, request: Request) -> None:
        try:
            reply = await self.server.app(request, self)
            if isinstance(reply, Response):
                self._write_whole(reply)
            elif not reply.ended:
                await reply.end()
        except (asyncio.CancelledError, ConnectionResetError):
            return  # the client is gone
        except Exception:
            log.exception("unhandled error answering %s %s", request.method, request.target)
            self.close()
            return
        finally:
            self.task = None
        if self.transport is None:
            return
        if self.closing:
            self.close()
        elif self.pending:
            nxt = self.pending.popleft()
            if isinstance(nxt, Response):
                self._write_last(nxt)
                return
            if len(self.pending) <= _PIPELINED and not self._last_read:
                self.transport.resume_reading()
            self._start(nxt)
        else:
            self.idle_since = time.monotonic()
            if self._continue_due:
                self._continue()

    def head(self, status: int, content_type: str, headers: dict[str, str] | None) -> bytes:
        """A reply's head, without its length header and the blank line."""
        lines = [
            b"HTTP/1.1 %d %b\r\n" % (status, _REASONS.get(status, b"Unknown")),
            self.server.date(),
            b"Content-Type: %b\r\n" % content_type.encode(),
        ]
        if headers:
            lines += [f"{k}: {v}\r\n".encode("latin-1") for k, v in headers.items()]
        if self.closing:
            lines.append(b"Connection: close\r\n")
        elif self._http_1_0:
            lines.append(b"Connection: keep-alive\r\n")  # HTTP/1.0 closes unless told
        return b"".join(lines)

    def _write_whole(self, reply: Response) -> None:
        if self.transport is None:
            raise ConnectionResetError("the client closed the connection")
        head = self.head(reply.status, reply.content_type, reply.headers)
        self.transport.write(
            b"%bContent-Length: %d\r\n\r\n%b" % (head, len(reply.body), reply.body)
        )
        if self.server.on_traffic is not None:
            self.server.on_traffic()

    def stream(
        self, content_type: str = "text/event-stream", headers: dict[str, str] | None = None
    ) -> EventStream:
        """A chunked 200 reply; its head goes out with the first write. HTTP/1.0 has no
        chunks: the body goes as it is, and closing the connection ends it."""
        if self._http_1_0:
            self.closing = True
            return EventStream(self, self.head(200, content_type, headers) + b"\r\n", False)
        head = self.head(200, content_type, headers) + b"Transfer-Encoding: chunked\r\n\r\n"
        return EventStream(self, head)

    async def send(self, data: bytes) -> None:
        if self.transport is None:
            raise ConnectionResetError("the client closed the connection")
        self.transport.write(data)
        if self.server.on_traffic is not None:
            self.server.on_traffic()
        waiter = self._write_ready
        if waiter is not None:
            await asyncio.shield(waiter)
            if self.transport is None:
                raise ConnectionResetError("the client closed the connection")

    def _refuse_body(self) -> None:
        self._too_large = True
        self._reject(413, f"request body exceeds the limit of {self.server.max_body_bytes} bytes")

    def _reject(self, status: int, message: str) -> None:
        """Answer an unparsable or oversized request and close (its bytes cannot be skipped),
        after the requests before it are answered."""
        if self.transport is None or self._last_read:
            return
        self._read_no_more()
        reply = self.server.error_reply(status, message)
        if self.task is None and not self.pending:
            self._write_last(reply)
        else:
            self.pending.append(reply)

    def _read_no_more(self) -> None:
        self._last_read = True
        self._continue_due = False
        if self.transport is not None:
            self.transport.pause_reading()

    def _write_last(self, reply: Response) -> None:
        self.closing = True
        self._http_1_0 = False
        with contextlib.suppress(ConnectionResetError):
            self._write_whole(reply)
        self.close()

    def _continue(self) -> None:
        self._continue_due = False
        if self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _origin_form(url: bytes) -> bytes:
    """The path and query of an absolute-form target (``http://host/path?q``), which a
    server must accept; other targets as they are."""
    try:
        parsed = httptools.parse_url(url)
    except httptools.HttpParserInvalidURLError:
        return url
    if not parsed.schema:
        return url
    path = parsed.path or b"/"
    return path + b"?" + parsed.query if parsed.query else path
