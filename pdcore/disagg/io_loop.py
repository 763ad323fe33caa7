"""The control plane's I/O thread: one per manager, owning its zmq sockets.

zmq sockets must not be shared between threads, and the engine loop must never wait on the
network, so every socket lives on this thread. The engine thread hands it work with
`call(fn)` (a queue plus a byte on a socketpair that wakes the poller at once, so a page
list leaves within microseconds, not at the next poll timeout), and `on_tick` runs
heartbeats and timeouts every `tick_s`.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

logger = logging.getLogger(__name__)

Handler = Callable[["zmq.Socket[Any]"], None]


class IOLoop:
    def __init__(self, name: str, on_tick: Callable[[], None], tick_s: float) -> None:
        self.ctx: zmq.Context[Any] = zmq.Context()
        self._poller = zmq.Poller()
        self._handlers: dict[zmq.Socket[Any], Handler] = {}
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._poller.register(self._wake_r.fileno(), zmq.POLLIN)
        self._on_tick, self._tick_s = on_tick, tick_s
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def call(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the I/O thread soon; safe from any thread."""
        self._calls.put(fn)
        # A full buffer means a wake-up is pending anyway; OSError: we are closing.
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def add_socket(self, sock: zmq.Socket[Any], handler: Handler) -> None:
        """I/O thread only."""
        self._handlers[sock] = handler
        self._poller.register(sock, zmq.POLLIN)

    def remove_socket(self, sock: zmq.Socket[Any]) -> None:
        """I/O thread only; also closes the socket (with the linger it was given)."""
        if self._handlers.pop(sock, None) is not None:
            self._poller.unregister(sock)
        sock.close()

    def _run(self) -> None:
        next_tick = time.monotonic()
        while not self._stop:
            timeout_ms = max(0, int((next_tick - time.monotonic()) * 1000))
            for sock, _ in self._poller.poll(timeout_ms):
                if isinstance(sock, int):
                    with contextlib.suppress(BlockingIOError):
                        self._wake_r.recv(4096)
                elif sock in self._handlers:
                    self._guard(self._handlers[sock], sock)
            while not self._calls.empty():
                self._guard(self._calls.get())
            if time.monotonic() >= next_tick:
                self._guard(self._on_tick)
                next_tick = time.monotonic() + self._tick_s
        while not self._calls.empty():  # e.g. aborts queued by close(): still send them
            self._guard(self._calls.get())
        for sock in list(self._handlers):
            self.remove_socket(sock)

    def _guard(self, fn: Callable[..., None], *args: Any) -> None:
        """A bug in one handler must not kill the thread every room depends on."""
        try:
            fn(*args)
        except Exception:
            logger.exception("PD control plane: error on the I/O thread")

    def close(self) -> None:
        """Stop the thread (sending what was queued) and close everything; idempotent."""
        if self.ctx.closed:
            return
        self._stop = True
        self.call(lambda: None)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if not self._thread.is_alive():  # never started (a failed start): close them here
            for sock in list(self._handlers):
                self.remove_socket(sock)
        self._wake_r.close()
        self._wake_w.close()
        self.ctx.term()
