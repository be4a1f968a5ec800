"""The router's HTTP/1.1 server (``router.app.http``) on a real socket, spoken to byte by byte."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from router.app.http import Connection, HttpServer
from router.app.routes import EventStream, NoRoute, Request, Response, Routes
from tests.router.conftest import run


def _server(max_body_bytes: int = 64) -> tuple[HttpServer, list[str]]:
    """Routes: POST /echo (the body back), GET /slow (answers after 0.2 s, or records its
    cancellation), GET /sse (three chunks), GET /items/{name}."""
    routes = Routes()
    events: list[str] = []

    async def echo(request: Request, conn: Connection) -> Response:
        return Response(request.body, content_type="text/plain")

    async def slow(request: Request, conn: Connection) -> Response:
        try:
            await asyncio.sleep(0.2)
        except asyncio.CancelledError:
            events.append("cancelled")
            raise
        return Response(b"slow", content_type="text/plain")

    async def sse(request: Request, conn: Connection) -> EventStream:
        stream = conn.stream()
        for i in range(3):
            await stream.write(b"data: %d\n\n" % i)
        await stream.end()
        return stream

    async def item(request: Request, conn: Connection) -> Response:
        return Response(orjson.dumps(request.params))

    routes.add("POST", "/echo", echo)
    routes.add("GET", "/slow", slow)
    routes.add("GET", "/sse", sse)
    routes.add("GET", "/items/{name}", item)

    async def app(request: Request, conn: Connection) -> Any:
        try:
            _, handler = routes.resolve(request)
        except NoRoute as exc:
            return Response(b"no route", exc.status, headers={"Allow": ",".join(exc.allowed)})
        return await handler(request, conn)

    def error_reply(status: int, message: str) -> Response:
        return Response(orjson.dumps({"error": {"message": message}}), status)

    return HttpServer(app, error_reply, max_body_bytes), events


async def _read_reply(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    status_line, *lines = head.strip().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif "transfer-encoding" not in headers:
        body = await reader.read()  # HTTP/1.0 stream: to the end of the connection
    else:
        assert headers["transfer-encoding"] == "chunked"
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
    return int(status_line.split()[1]), headers, body


def _post(path: str, body: bytes, extra: str = "") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


def test_keep_alive_pipelining_and_routes() -> None:
    async def body() -> None:
        server, _ = _server()
        port = await server.listen_tcp("127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        # Three requests in one write: answered in order on the same connection.
        writer.write(_post("/echo", b"one") + b"GET /items/a%3A1 HTTP/1.1\r\nHost: x\r\n\r\n")
        writer.write(_post("/echo", b"three"))
        status, headers, reply = await _read_reply(reader)
        assert (status, reply, headers["content-type"]) == (200, b"one", "text/plain")
        assert "date" in headers and "connection" not in headers
        status, _, reply = await _read_reply(reader)
        assert status == 200 and orjson.loads(reply) == {"name": "a%3A1"}
        assert (await _read_reply(reader))[2] == b"three"
        # Chunked request bodies are read whole.
        writer.write(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        )
        assert (await _read_reply(reader))[2] == b"abcde"
        # Streams are chunked.
        writer.write(b"GET /sse HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, reply = await _read_reply(reader)
        assert status == 200 and headers["content-type"] == "text/event-stream"
        assert reply == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
        # Unknown path and wrong method.
        writer.write(b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await _read_reply(reader))[0] == 404
        writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, _ = await _read_reply(reader)
        assert status == 405 and headers["allow"] == "POST"
        # Connection: close is honoured after the reply.
        writer.write(_post("/echo", b"bye", "Connection: close\r\n"))
        status, headers, reply = await _read_reply(reader)
        assert reply == b"bye" and headers["connection"] == "close"
        assert await reader.read() == b""
        writer.close()
        await server.close()

    run(body())


def test_oversized_and_malformed_requests_are_refused() -> None:
    async def body() -> None:
        server, _ = _server(max_body_bytes=64)
        port = await server.listen_tcp("127.0.0.1", 0)
        # Expect: 100-continue with a body too large: the 413 comes before the body is sent.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        status, _, reply = await _read_reply(reader)
        assert status == 413 and orjson.loads(reply)["error"]
        assert await reader.read() == b""  # closed: the unread body cannot be skipped
        writer.close()
        # A small body with Expect gets the 100 Continue, then its answer.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
        )
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"ok")
        assert (await _read_reply(reader))[2] == b"ok"
        # A chunked body that grows past the limit.
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"40\r\n" + b"a" * 64 + b"\r\n1\r\nb\r\n0\r\n\r\n")
        assert (await _read_reply(reader))[0] == 413
        writer.close()
        # Bytes that are not HTTP: a 400 and the connection closes.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"HELLO THERE\r\n\r\n")
        status, _, reply = await _read_reply(reader)
        assert status == 400 and "malformed" in orjson.loads(reply)["error"]["message"]
        assert await reader.read() == b""
        writer.close()
        await server.close()

    run(body())


def test_a_client_that_leaves_cancels_its_handler() -> None:
    async def body() -> None:
        server, events = _server()
        port = await server.listen_tcp("127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(0.05)
        writer.close()
        for _ in range(100):
            if events:
                break
            await asyncio.sleep(0.01)
        assert events == ["cancelled"]
        # close() lets a request in flight finish, then closes the connection.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(0.05)
        await server.close(grace_s=5)
        status, _, reply = await _read_reply(reader)
        assert (status, reply) == (200, b"slow")
        assert await reader.read() == b""
        writer.close()

    run(body())


def test_idle_keep_alive_connections_close() -> None:
    async def body() -> None:
        server, _ = _server()
        server.keepalive_s = 0.2
        port = await server.listen_tcp("127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_post("/echo", b"x"))
        assert (await _read_reply(reader))[2] == b"x"
        assert await asyncio.wait_for(reader.read(), 2) == b""
        writer.close()
        await server.close()

    run(body())


def test_an_unparsable_request_is_refused_after_the_requests_before_it() -> None:
    async def body() -> None:
        server, events = _server()
        port = await server.listen_tcp("127.0.0.1", 0)
        # Two good requests and garbage in one write: both are answered, then the 400.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            _post("/echo", b"one") + b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nGARBAGE\r\n\r\n"
        )
        assert (await _read_reply(reader))[2] == b"one"
        status, headers, reply = await _read_reply(reader)
        assert (status, reply) == (200, b"slow") and "connection" not in headers
        status, headers, _ = await _read_reply(reader)
        assert status == 400 and headers["connection"] == "close"
        assert await reader.read() == b"" and events == []
        writer.close()
        # Garbage while a stream is being written: the stream ends whole, then the 400.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /sse HTTP/1.1\r\nHost: x\r\n\r\nGARBAGE\r\n\r\n")
        status, _, reply = await _read_reply(reader)
        assert status == 200 and reply == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
        assert (await _read_reply(reader))[0] == 400
        assert await reader.read() == b""
        writer.close()
        # An oversized body behind a request in flight: that request's answer, then the 413.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
        )
        assert (await _read_reply(reader))[2] == b"slow"
        assert (await _read_reply(reader))[0] == 413
        assert await reader.read() == b""
        writer.close()
        # Bytes after a Connection: close request are not answered at all.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_post("/echo", b"last", "Connection: close\r\n") + b"GARBAGE\r\n\r\n")
        status, headers, reply = await _read_reply(reader)
        assert (reply, headers["connection"]) == (b"last", "close")
        assert await reader.read() == b""
        writer.close()
        await server.close()

    run(body())


def test_100_continue_waits_for_its_turn() -> None:
    async def body() -> None:
        server, _ = _server()
        port = await server.listen_tcp("127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        # Behind a request in flight, the 100 comes after that request's answer.
        writer.write(
            b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
        )
        assert (await _read_reply(reader))[2] == b"slow"
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"ok")
        assert (await _read_reply(reader))[2] == b"ok"
        # The header sent twice still asks for it.
        writer.write(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
            b"Expect: 100-continue\r\nExpect: 100-continue\r\n\r\n"
        )
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"no")
        assert (await _read_reply(reader))[2] == b"no"
        writer.close()
        await server.close()

    run(body())


def test_http_versions_host_and_absolute_targets() -> None:
    async def body() -> None:
        server, _ = _server()
        port = await server.listen_tcp("127.0.0.1", 0)

        async def exchange(raw: bytes) -> tuple[int, dict[str, str], bytes]:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(raw)
            try:
                return await _read_reply(reader)
            finally:
                writer.close()

        # HTTP/1.0: a stream goes unchunked and ends with the connection.
        status, headers, reply = await exchange(b"GET /sse HTTP/1.0\r\n\r\n")
        assert status == 200 and "transfer-encoding" not in headers
        assert headers["connection"] == "close"
        assert reply == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
        # HTTP/1.0 with keep-alive: said so in the reply, and the connection serves on.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for text in (b"a", b"b"):
            writer.write(
                b"POST /echo HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n" + text
            )
            status, headers, reply = await _read_reply(reader)
            assert (reply, headers["connection"]) == (text, "keep-alive")
        writer.close()
        # HTTP/1.1 needs Host; other versions are refused.
        status, _, reply = await exchange(b"GET /items/a HTTP/1.1\r\n\r\n")
        assert status == 400 and "Host" in orjson.loads(reply)["error"]["message"]
        status, _, reply = await exchange(b"GET /items/a HTTP/2.0\r\nHost: x\r\n\r\n")
        assert status == 505 and "HTTP/2.0" in orjson.loads(reply)["error"]["message"]
        # An absolute-form target is served by its path.
        status, _, reply = await exchange(
            b"GET http://x:8000/items/abc?q=1 HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        assert status == 200 and orjson.loads(reply) == {"name": "abc"}
        await server.close()

    run(body())
