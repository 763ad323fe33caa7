"""What the model server and the router share at the HTTP edge: OpenAI-style error
bodies and responses for every failure, JSON body parsing that turns client mistakes into
4xx, and a start-up check that the port can be bound. Imports neither the server nor the
engine, so the router stays light."""

from __future__ import annotations

import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response


class ProtocolError(Exception):
    """A request the server refuses; rendered as {"error": {...}} with `status`."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        status: int = 400,
        type: str = "invalid_request_error",
        code: str | int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.type = type
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(
    message: str,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | int | None = None,
) -> dict[str, Any]:
    """The body OpenAI returns for every error, which its client libraries parse."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def parse_json(raw: bytes) -> Any:
    """The request body as JSON; malformed JSON is the client's error, not a 500."""
    if not raw.strip():
        raise ProtocolError("The request body is empty; expected a JSON object")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"Malformed JSON in the request body: {exc}") from exc


def require_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ProtocolError("The request body must be a JSON object")
    return body


Handler = Callable[[Request, Exception], Awaitable[Response]]


def error_handlers(internal_prefix: str) -> dict[type[Exception] | int, Handler]:
    """Starlette exception handlers: ProtocolError as is, 404/405 explained, anything else a
    500 whose message starts with `internal_prefix` (Starlette re-raises it for the log)."""

    async def protocol_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ProtocolError)
        return JSONResponse(exc.body(), status_code=exc.status)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            message = f"Not found: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        body = error_body(message, code=exc.status_code)
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    async def internal_error(request: Request, exc: Exception) -> Response:
        body = error_body(f"{internal_prefix}: {type(exc).__name__}: {exc}", type="server_error")
        return JSONResponse(body, status_code=500)

    return {ProtocolError: protocol_error, HTTPException: http_error, Exception: internal_error}


def check_port(prog: str, host: str, port: int) -> None:
    """Exit with a clear message if host:port cannot be listened on."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise SystemExit(f"{prog}: cannot resolve --host {host!r}: {exc}") from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as exc:
            raise SystemExit(
                f"{prog}: cannot listen on {host}:{port}: {exc.strerror or exc}"
            ) from None
