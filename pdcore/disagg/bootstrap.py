"""The bootstrap server a prefill instance runs (--disaggregation-bootstrap-port, 8998).

Decode instances learn from it where this prefill's control socket is (`GET /route`), and
load balancers and `telnet`-style checks see it alive (`GET /health`). It is a stdlib
threading HTTP server on a daemon thread, so it never blocks the engine loop and adds no
dependency; everything after the lookup goes over zmq.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class BootstrapError(Exception):
    """The bootstrap server could not start, or a prefill's could not be reached."""


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._reply(200, b"OK", "text/plain")
        elif path == "/route":
            body = json.dumps(self.server.route()).encode()
            self._reply(200, body, "application/json")
        else:
            self._reply(404, b"not found", "text/plain")

    def _reply(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # heartbeats and lookups would flood the log


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], route: Callable[[], dict[str, Any]]) -> None:
        self.route = route
        super().__init__(addr, _Handler)


class BootstrapServer:
    """Serves `route()` (what decode needs to reach this prefill) on host:port."""

    def __init__(self, host: str, port: int, route: Callable[[], dict[str, Any]]) -> None:
        try:
            self._server = _Server((host, port), route)
        except OSError as exc:
            raise BootstrapError(
                f"cannot start the bootstrap server on {host}:{port}: {exc}; "
                "choose another --disaggregation-bootstrap-port"
            ) from exc
        self.host, self.port = host, int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="pd-bootstrap-http",
            daemon=True,
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def fetch_route(host: str, port: int, timeout: float) -> dict[str, Any]:
    """GET /route from a prefill's bootstrap server; BootstrapError naming host:port when it
    cannot be reached within `timeout` or answers with something else."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/route")
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise BootstrapError(f"bootstrap server {host}:{port} answered {resp.status}")
        data = json.loads(body)
        if not isinstance(data, dict) or "endpoint" not in data:
            raise BootstrapError(f"{host}:{port} is not a pdcore prefill bootstrap server")
        return data
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise BootstrapError(
            f"cannot reach the prefill bootstrap server at {host}:{port}: {exc} "
            "(is the prefill instance up, and is this its --disaggregation-bootstrap-port?)"
        ) from exc
    finally:
        conn.close()


def reachable_endpoint(endpoint: str, bootstrap_host: str) -> str:
    """A prefill bound to a wildcard address (--host 0.0.0.0) advertises it as such; reach
    it where its bootstrap server answered instead."""
    scheme, _, rest = endpoint.partition("://")
    host, _, port = rest.rpartition(":")
    if host.strip("[]") in ("0.0.0.0", "::", "*", ""):
        host = f"[{bootstrap_host}]" if ":" in bootstrap_host else bootstrap_host
    return f"{scheme}://{host}:{port}"
