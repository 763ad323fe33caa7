"""A notification side channel over zmq, for transfer backends whose transport has none.

The receiver binds an inbox and advertises its endpoint in its describe() blob; the sender
opens an outbox to it and pushes (sender id, payload) once the batch's data is in place.
Used by `ChannelBackend` (pd_fake, pd_mooncake, pd_ascend, the example tcp backend), so
every channel-style backend delivers notifications the same way. Not
thread-safe (zmq sockets are not): callers hold their own lock.
"""

from __future__ import annotations

import socket
from typing import Any

import zmq

from pdcore.disagg.transfer import Notification, TransferError

WILDCARD_HOSTS = ("0.0.0.0", "::", "", "*")


def advertised_host(host: str) -> str:
    """The address peers reach us at: `host`, or this machine's address for a wildcard
    (a peer cannot connect to 0.0.0.0)."""
    if host in WILDCARD_HOSTS:
        try:
            return socket.gethostbyname(socket.gethostname())
        except OSError:
            return "127.0.0.1"
    return host


class NotificationChannel:
    @classmethod
    def for_host(cls, host: str) -> NotificationChannel:
        """Bound to `host` (all interfaces for a wildcard), advertising an address peers
        can reach (`advertised_host`)."""
        bind = "*" if host in WILDCARD_HOSTS else host
        return cls(bind, advertise_host=advertised_host(host))

    def __init__(self, bind_host: str, advertise_host: str | None = None) -> None:
        self._ctx: zmq.Context[Any] = zmq.Context()
        self._inbox = self._ctx.socket(zmq.PULL)
        self._inbox.setsockopt(zmq.LINGER, 0)
        port = self._inbox.bind_to_random_port(f"tcp://{bind_host}")
        self.endpoint = f"tcp://{advertise_host or bind_host}:{port}"

    def open_outbox(self, peer_id: str, endpoint: str) -> zmq.Socket[Any]:
        """A PUSH socket to a peer's inbox that queues only to a live connection."""
        sock = self._ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            sock.close()
            raise TransferError(f"cannot reach peer {peer_id!r} at {endpoint}: {exc}") from exc
        return sock

    @staticmethod
    def send(outbox: zmq.Socket[Any], sender: str, payload: bytes) -> bool:
        """Push one notification; False while there is no live connection yet (retry later)."""
        try:
            outbox.send_multipart([sender.encode(), bytes(payload)], flags=zmq.NOBLOCK)
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            raise TransferError(f"sending a notification failed: {exc}") from exc
        return True

    def drain(self) -> list[Notification]:
        """Every notification that has arrived, without blocking."""
        out: list[Notification] = []
        while True:
            try:
                frames = self._inbox.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return out
            if len(frames) == 2:  # anything else was not sent by a NotificationChannel
                out.append(Notification(frames[0].decode(errors="replace"), frames[1]))

    def close(self) -> None:
        self._inbox.close(linger=0)
        self._ctx.term()
