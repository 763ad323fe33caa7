"""The router's coalescing transport: the writes of one event-loop turn leave as one write,
in order; close() sends what is pending first; a closing transport gets nothing."""

from __future__ import annotations

import asyncio

from pdcore.router.http_protocol import CoalescingTransport


class Recorder:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


def test_one_turn_one_write_in_order_and_close_flushes() -> None:
    async def main() -> Recorder:
        loop = asyncio.get_running_loop()
        real = Recorder()
        t = CoalescingTransport(real, loop)  # type: ignore[arg-type]
        t.write(b"HTTP/1.1 200 OK\r\n\r\n")
        t.write(b"")
        t.write(b"body")
        assert real.writes == []  # nothing sent within the turn
        await asyncio.sleep(0)
        assert real.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
        t.write(b"event 1")
        await asyncio.sleep(0)
        t.write(b"event 2")
        t.close()  # pending bytes go out before the close
        assert real.writes[1:] == [b"event 1", b"event 2"] and real.closed
        t.write(b"late")
        await asyncio.sleep(0)
        assert real.writes[-1] == b"event 2"  # a closing transport gets nothing more
        assert t.get_extra_info("peername") == "info:peername"  # the rest is delegated
        return real

    asyncio.run(main())
