"""The bootstrap server a prefill instance runs (--disaggregation-bootstrap-port, 8998).

Decode instances learn from it where this prefill's control socket is (`GET /route`), and
load balancers and `telnet`-style checks see it alive (`GET /health`). It is a stdlib
threading HTTP server on a daemon thread, so it never blocks the engine loop and adds no
dependency; everything after the lookup goes over zmq.

With `--dp-size N` on prefill, the HTTP server process runs the one bootstrap server of the
instance (`replica_routes`): `GET /route?dp_rank=r` answers dp replica r's route (each
replica's engine serves its own on a private port), plus `dp_rank` and `dp_size`; a query
without `dp_rank` answers replica 0's. The replica holding a request is `room % dp_size`.
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pdcore.disagg.auth import HEADER, ROUTE_ANSWER, ROUTE_QUERY, AuthError, ControlAuth

logger = logging.getLogger(__name__)


class BootstrapError(Exception):
    """The bootstrap server could not start, or a prefill's could not be reached."""


class BootstrapRefused(BootstrapError):
    """The prefill's bootstrap server (or its answer) failed authentication: retrying with
    the same token cannot help, so decode fails at once."""


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        url = urlsplit(self.path)
        if url.path == "/health":
            self._reply(200, b"OK", "text/plain")
        elif url.path == "/route":
            auth = self.server.auth
            try:  # before anything about this prefill is told
                auth.check_header(ROUTE_QUERY, self.headers.get(HEADER), _signed(self.path))
            except AuthError as exc:
                self.server.on_refused(f"bootstrap query from {self.client_address[0]}", exc)
                self._reply(401, f"refused: {exc}".encode(), "text/plain")
                return
            raw = parse_qs(url.query).get("dp_rank", [None])[0]
            if raw is not None and not raw.isdigit():
                self._reply(400, b"dp_rank must be a non-negative integer", "text/plain")
                return
            try:
                route = self.server.route(None if raw is None else int(raw))
            except BootstrapError as exc:  # a dp replica's own server did not answer
                self._reply(503, str(exc).encode(), "text/plain")
                return
            if route is None:
                self._reply(404, f"this prefill has no dp rank {raw}".encode(), "text/plain")
                return
            body = json.dumps(route).encode()
            self._reply(200, body, "application/json", auth.header(ROUTE_ANSWER, body))
        else:
            self._reply(404, b"not found", "text/plain")

    def _reply(
        self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # heartbeats and lookups would flood the log


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        addr: tuple[str, int],
        route: Route,
        auth: ControlAuth,
        on_refused: Callable[[str, AuthError], None],
    ) -> None:
        self.route, self.auth, self.on_refused = route, auth, on_refused
        super().__init__(addr, _Handler)


Route = Callable[[int | None], dict[str, Any] | None]
"""What decode needs to reach dp rank `r` of this prefill (None: no dp rank asked for);
None when there is no such rank. May raise BootstrapError (answered 503)."""


def _signed(path: str) -> bytes:
    """What a /route query's auth header signs: the request line's method and path."""
    return f"GET {path}".encode()


class BootstrapServer:
    """Serves `route(dp_rank)` (what decode needs to reach this prefill) on host:port; with
    an enabled `auth`, only to signed queries (`on_refused` hears of the others)."""

    def __init__(
        self,
        host: str,
        port: int,
        route: Route,
        auth: ControlAuth | None = None,
        on_refused: Callable[[str, AuthError], None] | None = None,
    ) -> None:
        try:
            self._server = _Server(
                (host, port), route, auth or ControlAuth(None), on_refused or _log_refused
            )
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


def _log_refused(what: str, exc: AuthError) -> None:
    logger.warning("PD control plane: refused %s: %s", what, exc)


def fetch_route(
    host: str,
    port: int,
    timeout: float,
    auth: ControlAuth | None = None,
    dp_rank: int | None = None,
) -> dict[str, Any]:
    """GET /route from a prefill's bootstrap server (of its dp rank `dp_rank`, when given);
    BootstrapError naming host:port when it cannot be reached within `timeout` or answers
    with something else, BootstrapRefused when either side fails the other's
    authentication (`auth`)."""
    auth = auth or ControlAuth(None)
    path = "/route" if dp_rank is None else f"/route?dp_rank={int(dp_rank)}"
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers=auth.header(ROUTE_QUERY, _signed(path)))
        resp = conn.getresponse()
        body = resp.read()
        if resp.status == 401:
            raise BootstrapRefused(
                f"the prefill bootstrap server at {host}:{port} refused this decode: "
                f"{body.decode(errors='replace')[:300]}"
            )
        if resp.status == 200:
            try:
                auth.check_header(ROUTE_ANSWER, resp.getheader(HEADER), body)
            except AuthError as exc:
                raise BootstrapRefused(
                    f"the prefill bootstrap server at {host}:{port} did not authenticate "
                    f"itself: {exc}"
                ) from None
        if resp.status != 200:
            why = body.decode(errors="replace")[:300]
            raise BootstrapError(f"bootstrap server {host}:{port} answered {resp.status}: {why}")
        data = json.loads(body)
        if not isinstance(data, dict) or "endpoint" not in data:
            raise BootstrapError(f"{host}:{port} is not a pdcore prefill bootstrap server")
        return data
    except BootstrapRefused:
        raise
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


def replica_routes(host: str, ports: Sequence[int], timeout: float, auth: ControlAuth) -> Route:
    """The route of a prefill with `--dp-size len(ports)`: dp replica r's engine serves its
    own bootstrap server on `ports[r]` (on `host`); the answer for dp rank r is that
    server's, asked afresh each time (a replica that died answers nothing, so decode fails
    its rooms rather than register with a dead socket), plus `dp_rank` and `dp_size`."""

    def route(dp_rank: int | None) -> dict[str, Any] | None:
        rank = dp_rank or 0
        if rank >= len(ports):
            return None
        try:
            data = fetch_route(host, ports[rank], timeout, auth)
        except BootstrapError as exc:
            raise BootstrapError(f"prefill dp rank {rank} does not answer: {exc}") from None
        return {**data, "dp_rank": rank, "dp_size": len(ports)}

    return route
