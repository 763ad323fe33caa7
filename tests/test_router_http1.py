"""The legs' HTTP/1.1 client (pdcore/router/http1.py) against raw asyncio servers: framing
split across reads, keep-alive reuse, errors, and closing a response before its end."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import pytest

from pdcore.router import http1

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _serve(handler: Handler) -> tuple[asyncio.Server, str, list[int]]:
    """A server on a free port; `conns` counts the connections it accepted."""
    conns: list[int] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conns.append(1)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await handler(reader, writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}", conns


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.startswith(b"content-length")
    )
    return await reader.readexactly(length)


def _client(read_timeout: float = 5.0) -> http1.Client:
    return http1.Client(connect_timeout=2.0, read_timeout=read_timeout, keepalive=4.0)


def test_chunked_body_split_across_reads_and_connection_reused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            body = await _read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n")
            writer.write(b"transfer-encoding: chunked\r\n\r\n")
            for piece in (b"9\r\ndata: a", b"\n\n\r\n", b"5\r\n" + body[:5] + b"\r\n0\r\n\r\n"):
                await writer.drain()
                writer.write(piece)
                await asyncio.sleep(0.01)

    async def main() -> None:
        server, url, conns = await _serve(handler)
        async with server, _client() as client:
            for _ in range(3):
                r = await client.post(url, "/generate", b"hello world", {"x-request-id": "r1"})
                assert r.status == 200 and r.headers["content-type"] == "text/event-stream"
                assert await r.read() == b"data: a\n\nhello"
        assert len(conns) == 1  # keep-alive: one connection for the three calls

    asyncio.run(main())


def test_content_length_and_error_status() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\nX-A: 1\r\n\r\nbu")
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(b"sy")
        await writer.drain()
        await reader.read()

    async def main() -> None:
        server, url, _ = await _serve(handler)
        async with server, _client() as client:
            r = await client.post(url, "/x", b"{}", {})
            assert (r.status, r.headers["x-a"]) == (503, "1")
            assert await r.read() == b"busy"

    asyncio.run(main())


def test_dropped_connection_timeout_and_no_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        body = await _read_request(reader)
        if body == b"drop":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
            await writer.drain()
            writer.close()
        else:  # silent
            await asyncio.sleep(5)

    async def main() -> None:
        server, url, _ = await _serve(handler)
        async with server, _client(read_timeout=0.2) as client:
            r = await client.post(url, "/x", b"drop", {})
            with pytest.raises(http1.ConnectionClosed):
                await r.read()
            with pytest.raises(http1.ReadTimeout):
                await client.post(url, "/x", b"silent", {})
        with pytest.raises(http1.ConnectFailed) as info:
            await _client().post(url, "/x", b"", {})  # the server is closed now
        assert not info.value.timed_out

    asyncio.run(main())


def test_a_pooled_connection_already_closing_is_not_reused() -> None:
    """A worker killed with kill -9 resets its kept-alive connections; until the loop runs
    connection_lost() such a connection still looks idle. A call must not be written to it
    (uvloop raises RuntimeError: "the handler is closed"), but go out on a new one."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await _read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()

    async def main() -> None:
        server, url, conns = await _serve(handler)
        async with server, _client() as client:
            r = await client.post(url, "/x", b"a", {})
            assert await r.read() == b"ok"
            [(conn, _)] = next(iter(client._idle.values()))
            assert conn.transport is not None
            conn.transport.abort()  # closing now, connection_lost() not run yet
            assert not conn.lost
            r = await client.post(url, "/x", b"b", {})
            assert await r.read() == b"ok"
        assert len(conns) == 2

    asyncio.run(main())


def test_closing_before_the_end_closes_the_connection() -> None:
    """How a worker learns that the router cancelled the request."""
    disconnected = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await writer.drain()
        if await reader.read() == b"":  # EOF: the client went away
            disconnected.set()

    async def main() -> None:
        server, url, conns = await _serve(handler)
        async with server, _client() as client:
            r = await client.post(url, "/x", b"", {})
            chunks = r.chunks()
            assert await chunks.__anext__() == b"abc"
            r.close()
            await asyncio.wait_for(disconnected.wait(), 2)

    asyncio.run(main())


def test_header_values_cannot_inject_lines() -> None:
    async def main() -> None:
        with pytest.raises(ValueError):
            await _client().post("http://127.0.0.1:9", "/x", b"", {"x-request-id": "a\r\nb: c"})

    asyncio.run(main())
