"""The HTTP/1.1 client of the legs: keep-alive connections to the workers, one POST at a
time on each, the response body handed over as the bytes arrive.

Why not httpx or aiohttp: a leg is the router's hot path, two per request. httpx's pool
costs grow with connections x requests (at 64 concurrent requests the router did ~20
req/s), and aiohttp spends ~250 us of CPU a call (see docs/router.md). This client does
what a leg needs and no more -- no proxies, TLS, redirects, cookies or compression
(workers speak plain HTTP on a private network) -- and parses only what framing needs:
the status line, the headers, Content-Length or chunked encoding.

Errors: `ConnectFailed` (cannot connect, or not within the connect timeout), `ReadTimeout`
(no byte for `read_timeout` seconds, from the request sent to the body's end) and
`ConnectionClosed` (the connection dropped, or the answer is not HTTP/1.x). A response
read to its end puts its connection back in the pool; one closed before that closes the
connection, which is how a worker learns that the request was cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

_PAUSE_AT = 1 << 20  # stop reading the socket while this much is buffered and unread


class HTTPError(Exception):
    """A call failed below HTTP: no connection, silence, or a dropped connection."""


class ConnectFailed(HTTPError):
    def __init__(self, detail: str, *, timed_out: bool = False) -> None:
        super().__init__(detail)
        self.timed_out = timed_out


class ReadTimeout(HTTPError):
    pass


class ConnectionClosed(HTTPError):
    pass


def _time_out(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(ReadTimeout("no data within the read timeout"))


class _Connection(asyncio.Protocol):
    """One TCP connection: what arrived and is not consumed yet, and whether it is over."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.lost = False
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > _PAUSE_AT and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.lost = True
        self._wake()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def more(self, timeout: float) -> None:
        """Wait until more bytes arrive; ConnectionClosed if none ever will."""
        if self.lost:
            raise ConnectionClosed("the worker closed the connection before the response ended")
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        self.waiter = waiter = self.loop.create_future()
        timer = self.loop.call_later(timeout, _time_out, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self.waiter = None
        if self.lost and not self.buf:
            raise ConnectionClosed("the worker closed the connection before the response ended")

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()


class Response:
    """A response head; the body is read with `chunks()` or `read()`, once."""

    def __init__(
        self,
        client: Client,
        key: tuple[str, int],
        conn: _Connection,
        status: int,
        headers: dict[str, str],
    ) -> None:
        self._client = client
        self._key = key
        self._conn: _Connection | None = conn
        self.status = status
        self.headers = headers  # lower-case names; a repeated header's values joined by ", "
        self._keep_alive = headers.get("connection", "").lower() != "close"

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (chunked encoding removed)."""
        conn = self._conn
        assert conn is not None, "the body was read already, or the response closed"
        timeout = self._client.read_timeout
        buf = conn.buf
        te = self.headers.get("transfer-encoding", "").lower()
        if self.status in (204, 304):
            pass
        elif "chunked" in te:
            while True:
                while (i := buf.find(b"\r\n")) < 0:
                    await conn.more(timeout)
                try:
                    size = int(bytes(buf[:i]).split(b";", 1)[0], 16)
                except ValueError:
                    raise ConnectionClosed("the worker sent a malformed chunk") from None
                del buf[: i + 2]
                if size == 0:
                    while (i := buf.find(b"\r\n")) != 0:  # trailers, up to an empty line
                        if i > 0:
                            del buf[: i + 2]
                        else:
                            await conn.more(timeout)
                    del buf[:2]
                    break
                while size:
                    if not buf:
                        await conn.more(timeout)
                    data = bytes(buf[:size])
                    del buf[: len(data)]
                    size -= len(data)
                    yield data
                while len(buf) < 2:
                    await conn.more(timeout)
                del buf[:2]
        elif "content-length" in self.headers:
            try:
                size = int(self.headers["content-length"])
            except ValueError:
                raise ConnectionClosed("the worker sent a malformed Content-Length") from None
            while size:
                if not buf:
                    await conn.more(timeout)
                data = bytes(buf[:size])
                del buf[: len(data)]
                size -= len(data)
                yield data
        else:  # the body ends when the connection does
            self._keep_alive = False
            while True:
                if buf:
                    data = bytes(buf)
                    buf.clear()
                    yield data
                if conn.lost:
                    break
                try:
                    await conn.more(timeout)
                except ConnectionClosed:
                    break
        self._release()

    async def read(self) -> bytes:
        parts = [chunk async for chunk in self.chunks()]
        return b"".join(parts)

    def _release(self) -> None:
        """The body is complete: the connection serves the next request (or closes)."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._keep_alive and not conn.lost and not conn.buf:
            self._client._put(self._key, conn)
        else:
            conn.close()

    def close(self) -> None:
        """Close the connection unless the body was read to its end."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class Client:
    """Keep-alive HTTP/1.1 connections to any number of workers, without a limit."""

    def __init__(self, connect_timeout: float, read_timeout: float, keepalive: float) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.keepalive = keepalive
        self._idle: dict[tuple[str, int], list[tuple[_Connection, float]]] = {}
        self._addresses: dict[str, tuple[str, int, str]] = {}

    def _address(self, base_url: str) -> tuple[str, int, str]:
        """(host, port, Host header) of a worker URL such as http://10.0.0.2:30000."""
        address = self._addresses.get(base_url)
        if address is None:
            parts = urlsplit(base_url)
            if parts.scheme != "http" or not parts.hostname:
                raise ConnectFailed(f"only http:// worker URLs are supported, not {base_url!r}")
            address = (parts.hostname, parts.port or 80, parts.netloc)
            self._addresses[base_url] = address
        return address

    def _put(self, key: tuple[str, int], conn: _Connection) -> None:
        loop = conn.loop
        idle = self._idle.setdefault(key, [])
        now = loop.time()
        while idle and now - idle[0][1] > self.keepalive:  # expire the oldest first
            idle.pop(0)[0].close()
        idle.append((conn, now))

    async def _connect(self, key: tuple[str, int]) -> _Connection:
        loop = asyncio.get_running_loop()
        idle = self._idle.get(key)
        now = loop.time()
        while idle:
            conn, since = idle.pop()  # the most recently used
            usable = conn.transport is not None and not conn.transport.is_closing()
            if usable and not conn.lost and not conn.buf and now - since <= self.keepalive:
                return conn
            conn.close()
        host, port = key
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(loop), host, port),
                self.connect_timeout,
            )
        except asyncio.TimeoutError:
            raise ConnectFailed(
                f"no connection within {self.connect_timeout:g}s", timed_out=True
            ) from None
        except OSError as exc:
            raise ConnectFailed(str(exc) or type(exc).__name__) from exc
        return conn

    async def post(
        self, base_url: str, path: str, body: bytes, headers: dict[str, str]
    ) -> Response:
        """POST `body` to base_url + path; returns once the response head is here."""
        host, port, netloc = self._address(base_url)
        if any("\r" in v or "\n" in v for v in headers.values()):
            raise ValueError("a header value holds a line break")
        lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        head = (
            f"POST {path} HTTP/1.1\r\nhost: {netloc}\r\ncontent-length: {len(body)}\r\n"
            f"user-agent: pdcore-router\r\n{lines}\r\n"
        )
        key = (host, port)
        conn = await self._connect(key)
        try:
            # A kept-alive connection the worker dropped (it died, say) can be closing
            # before connection_lost() has run: writing to it raises RuntimeError (uvloop)
            # or OSError, which must fail the leg like any dropped connection.
            transport = conn.transport
            if transport is None or transport.is_closing():
                raise ConnectionClosed("the connection to the worker closed before the request")
            try:
                transport.write(head.encode("latin-1") + body)
            except (RuntimeError, OSError) as exc:
                raise ConnectionClosed(f"the request could not be sent: {exc}") from exc
            while True:
                status, fields = await _read_head(conn, self.read_timeout)
                if not 100 <= status < 200:  # skip 100 Continue and the like
                    return Response(self, key, conn, status, fields)
        except BaseException:
            conn.close()
            raise

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the idle connections."""
        for idle in self._idle.values():
            for conn, _ in idle:
                conn.close()
        self._idle.clear()


async def _read_head(conn: _Connection, timeout: float) -> tuple[int, dict[str, str]]:
    buf = conn.buf
    while (end := buf.find(b"\r\n\r\n")) < 0:
        await conn.more(timeout)
    text = bytes(buf[:end]).decode("latin-1")
    del buf[: end + 4]
    status_line, *lines = text.split("\r\n")
    version, _, rest = status_line.partition(" ")
    try:
        if not version.startswith("HTTP/1."):
            raise ValueError(version)
        status = int(rest[:3])
    except ValueError:
        raise ConnectionClosed(
            f"the worker did not answer HTTP/1.x: {status_line[:80]!r}"
        ) from None
    fields: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        name, value = name.strip().lower(), value.strip()
        fields[name] = f"{fields[name]}, {value}" if name in fields else value
    return status, fields
