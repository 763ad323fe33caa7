"""Settings of `pdcore router`: SGLang's router flags, each also a PDCORE_ROUTER_* env var.

The generic flags (`--host`, `--port`, `--policy`, ...) come from `RouterOptions` through
the shared `build_parser`. The worker flags keep SGLang's shape, which one flag per field
cannot express -- `--prefill URL [BOOTSTRAP_PORT]`, repeatable -- so `add_router_arguments`
declares those three by hand; `RouterSettings` validates all of them the same way, so a
bad value names its flag whether it came from the command line or the environment.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, field_validator, model_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import NoDecode, SettingsConfigDict

from pdcore.router.policy_settings import PolicyOptions
from pdcore.settings_base import (
    PdcoreSettings,
    build_parser,
    env_names,
    new_parser,
    setting,
    settings_or_exit,
)


def _invalid(message: str) -> PydanticCustomError:
    # A custom error keeps pydantic's "Value error, " prefix out of the message.
    return PydanticCustomError("invalid_router_setting", "{reason}", {"reason": message})


class PrefillWorker(BaseModel):
    """One `--prefill URL [BOOTSTRAP_PORT]`: the server's URL and its bootstrap port
    (None: the router sends null and the prefill uses its own default)."""

    model_config = ConfigDict(frozen=True)

    url: str
    bootstrap_port: int | None = None


def _check_url(url: Any) -> str:
    if not isinstance(url, str):
        raise _invalid(f"expected a URL, got {url!r}")
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _invalid(f"{url!r} is not an http(s) URL; expected http://HOST:PORT")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise _invalid(f"{url!r}: {exc}") from None
    return url.strip().rstrip("/")


def _bootstrap_port(value: Any, url: str) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    try:
        port = int(value)
    except (TypeError, ValueError):
        port = -1
    if isinstance(value, bool) or not 1 <= port <= 65535:
        raise _invalid(f"{url}: bootstrap port {value!r} is not a port (1-65535) or 'none'")
    return port


def _split_env_list(value: Any) -> Any:
    """An env var holds JSON (`[["http://p:30000", 8998]]`) or `URL [PORT],URL [PORT]`."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except ValueError as exc:
            raise _invalid(f"not valid JSON: {exc}") from None
    return [item.strip() for item in text.split(",") if item.strip()]


def _is_port_token(token: Any) -> bool:
    """A bootstrap port (or `none`) following a prefill URL, rather than another URL."""
    if token is None or isinstance(token, int):
        return True
    return isinstance(token, str) and (
        token.strip().isdigit() or token.strip().lower() in ("none", "null")
    )


def _prefill_items(item: Any) -> list[PrefillWorker]:
    """One `--prefill` occurrence (or env entry) as workers. It holds URLs, each optionally
    followed by its bootstrap port: `URL`, `URL PORT`, or the reference's `URL1 URL2 PORT2`."""
    if isinstance(item, PrefillWorker):
        return [item]
    if isinstance(item, dict):
        item = [item.get("url"), item.get("bootstrap_port")]
    elif isinstance(item, str):
        item = item.split()
    if not isinstance(item, (list, tuple)) or not item:
        raise _invalid(f"takes URLs, each optionally followed by a bootstrap port, got {item!r}")
    out: list[PrefillWorker] = []
    port_given = True
    for token in item:
        if not _is_port_token(token):
            out.append(PrefillWorker(url=_check_url(token)))
            port_given = False
            continue
        if not out or port_given:
            where = f"after {out[-1].url}" if out else "before any URL"
            raise _invalid(
                f"unexpected {token!r} {where}: each prefill URL may be followed by one "
                "bootstrap port (or 'none')"
            )
        out[-1] = PrefillWorker(url=out[-1].url, bootstrap_port=_bootstrap_port(token, out[-1].url))
        port_given = True
    return out


class RouterOptions(PdcoreSettings, PolicyOptions):
    """Router settings (pdcore router)."""

    model_config = SettingsConfigDict(env_prefix="PDCORE_ROUTER_")

    host: str = setting("127.0.0.1", "Address the router binds to.")
    port: int = setting(8000, "Port the router listens on.", ge=1, le=65535)
    router_processes: int = setting(
        1,
        "Router processes serving --host:--port together (one SO_REUSEPORT socket each), "
        "started and stopped by a supervisor; 1: one process, no supervisor. Worker "
        "registration reaches every process before it is answered, flow control and "
        "/metrics are global; each process runs its own health checks, circuit breakers "
        "and routing policy (docs/router.md).",
        ge=1,
    )
    policy: str = setting(
        "round_robin",
        "Routing policy for both roles unless --prefill-policy / --decode-policy say "
        "otherwise: an installed routing policy (pdcore plugins).",
        registry="routing_policy",
    )
    prefill_policy: str | None = setting(
        None,
        "Routing policy that picks the prefill server (default: --policy).",
        registry="routing_policy",
    )
    decode_policy: str | None = setting(
        None,
        "Routing policy that picks the decode server (default: --policy).",
        registry="routing_policy",
    )
    request_timeout_secs: float = setting(
        1800.0,
        "Most seconds a worker may stay silent -- before its response starts, or between "
        "two chunks of a stream -- before its leg fails.",
        gt=0,
    )
    worker_startup_timeout_secs: float = setting(
        600.0,
        "At start-up, wait this long for every worker's /health to answer 200 before "
        "giving up (0: do not wait).",
        ge=0,
    )
    worker_startup_check_interval: float = setting(
        0.5, "Seconds between two health probes of a worker while waiting at start-up.", gt=0
    )
    log_level: Literal["debug", "info", "warn", "warning", "error"] = setting(
        "info", "Logging level (`warn` is `warning`)."
    )
    # --- health checks ---
    health_check_interval_secs: float = setting(
        10.0,
        "Seconds between two active health checks of every worker (its health endpoint, "
        "and /get_load for the policies).",
        gt=0,
    )
    health_check_timeout_secs: float = setting(
        5.0, "A health check not answered within this many seconds failed.", gt=0
    )
    health_failure_threshold: int = setting(
        3, "Failed health checks in a row that take a worker out of rotation.", ge=1
    )
    health_success_threshold: int = setting(
        2, "Passed health checks in a row that bring an unhealthy worker back.", ge=1
    )
    health_check_endpoint: str = setting(
        "/health", "Path probed by the health checks (200 means healthy)."
    )
    disable_health_check: bool = setting(
        False,
        "No health checks: neither the wait at start-up nor the periodic checks (workers "
        "then leave rotation only through their circuit breakers).",
    )
    # --- retries ---
    retry_max_retries: int = setting(
        5,
        "Most attempts per request, the first included (SGLang's meaning: 1 = no retry). "
        "A retry uses a new bootstrap room and sends both legs again, on other workers when "
        "there are any; never once a byte of the answer reached the client.",
        ge=1,
    )
    retry_initial_backoff_ms: float = setting(
        50.0, "Pause before the first retry, in milliseconds.", ge=0
    )
    retry_max_backoff_ms: float = setting(
        30000.0, "Longest pause between two attempts, in milliseconds.", ge=0
    )
    retry_backoff_multiplier: float = setting(
        1.5, "Each pause is the previous one times this (capped by --retry-max-backoff-ms).", ge=1
    )
    retry_jitter_factor: float = setting(
        0.2, "Each pause is scaled by a random factor in [1 - this, 1 + this].", ge=0, le=1
    )
    disable_retries: bool = setting(False, "Never retry (as --retry-max-retries 1).")
    # --- circuit breakers ---
    cb_failure_threshold: int = setting(
        10, "Failed requests in a row on a worker that open its circuit breaker.", ge=1
    )
    cb_success_threshold: int = setting(
        3, "Successful requests in a row in half-open state that close the breaker.", ge=1
    )
    cb_timeout_duration_secs: float = setting(
        60.0, "Seconds an open breaker keeps its worker out before letting probes through.", gt=0
    )
    cb_window_duration_secs: float = setting(
        120.0,
        "A failure streak is forgotten when its last failure is older than this many seconds.",
        gt=0,
    )
    disable_circuit_breaker: bool = setting(
        False, "Breakers never open (failures are still counted, for /workers)."
    )
    # --- flow control ---
    max_concurrent_requests: int = setting(
        -1,
        "Most generation requests the router runs at once; more wait in a queue "
        "(-1 or 0: no limit).",
        ge=-1,
    )
    queue_size: int = setting(
        100,
        "Requests that may wait for a slot (with --max-concurrent-requests); one more is "
        "answered 429 at once (0: no queue).",
        ge=0,
    )
    queue_timeout_secs: float = setting(
        60.0, "A request that waited this long in the queue is answered 408.", gt=0
    )
    rate_limit_tokens_per_second: float | None = setting(
        None,
        "Most generation requests admitted per second (a token bucket holding one second's "
        "worth); one more is answered 429 at once. Default: no rate limit.",
        flags=["--rate-limit"],
        gt=0,
    )
    max_payload_size: int = setting(
        512 * 1024 * 1024, "Largest request body accepted, in bytes (larger: 413).", ge=1
    )
    http_header_timeout: float = setting(
        10.0,
        "Seconds a client has to send a request's headers (from connecting, or from the "
        "previous response on a kept-alive connection); a slower one is disconnected "
        "(slow-loris).",
        gt=0,
    )
    http_body_timeout: float = setting(
        30.0,
        "Seconds a client has to send a generation request's whole body (slower: 408).",
        gt=0,
    )
    # --- security and observability ---
    api_key: str | None = setting(
        None,
        "Clients must send `Authorization: Bearer KEY` (every route but /health, /liveness "
        "and /readiness); the router sends it to the workers too.",
    )
    request_id_headers: list[str] = setting(
        ["x-request-id", "x-correlation-id", "x-trace-id"],
        "Headers read, in order, for the client's request id (a new one is made when none "
        "is there); it goes to the workers and back to the client as X-Request-ID.",
    )
    cors_allowed_origins: list[str] = setting(
        [], "Origins allowed to call the router from a browser (CORS; `*` for any)."
    )
    prometheus_port: int | None = setting(
        None,
        "Also serve /metrics on this port (it is always on the router's own port).",
        ge=1,
        le=65535,
    )
    prometheus_host: str = setting("127.0.0.1", "Address the --prometheus-port server binds to.")
    prometheus_duration_buckets: list[float] | None = setting(
        None, "Bucket bounds, in seconds, of the latency and TTFT histograms."
    )
    shutdown_grace_period_secs: float = setting(
        5.0, "On SIGTERM or Ctrl-C, in-flight requests get this many seconds to finish.", ge=0
    )

    @property
    def max_attempts(self) -> int:
        return 1 if self.disable_retries else self.retry_max_retries

    def role_policy(self, role: str) -> str:
        """The policy name for `role` ("prefill" or "decode")."""
        chosen = self.prefill_policy if role == "prefill" else self.decode_policy
        return chosen or self.policy

    @field_validator("health_check_endpoint")
    @classmethod
    def _check_endpoint(cls, value: str) -> str:
        if not value.startswith("/"):
            raise _invalid(f"{value!r} is not a path; expected e.g. /health")
        return value


class RouterSettings(RouterOptions):
    """Router settings (pdcore router)."""

    pd_disaggregation: bool = setting(
        False, "Route each request to a prefill and a decode server (the only mode for now)."
    )
    prefill: Annotated[list[PrefillWorker], NoDecode] = setting(
        [],
        "Prefill servers: `--prefill URL [BOOTSTRAP_PORT] [URL [BOOTSTRAP_PORT] ...]`, the "
        "flag repeated or not. BOOTSTRAP_PORT is a port or `none` (the server's own "
        "--disaggregation-bootstrap-port, 8998 by default). Env: JSON, or "
        "`URL [PORT],URL [PORT]`.",
    )
    decode: Annotated[list[str], NoDecode] = setting(
        [],
        "Decode server URLs: `--decode URL [URL ...]`, the flag repeated or not. Env: JSON, "
        "or `URL,URL`.",
    )

    @field_validator("prefill", mode="before")
    @classmethod
    def _parse_prefill(cls, value: Any) -> list[PrefillWorker]:
        items = _split_env_list(value)
        if not isinstance(items, list):
            raise _invalid(f"expected a list of prefill servers, got {items!r}")
        workers = [w for item in items for w in _prefill_items(item)]
        urls = [w.url for w in workers]
        if len(set(urls)) != len(urls):
            raise _invalid(f"a prefill server is listed twice: {urls}")
        return workers

    @field_validator("decode", mode="before")
    @classmethod
    def _parse_decode(cls, value: Any) -> list[str]:
        items = _split_env_list(value)
        if not isinstance(items, list):
            raise _invalid(f"expected a list of decode server URLs, got {items!r}")
        flat: list[Any] = []
        for item in items:  # argparse gives one list per --decode
            flat.extend(item if isinstance(item, (list, tuple)) else [item])
        urls = [_check_url(url) for url in flat]
        if len(set(urls)) != len(urls):
            raise _invalid(f"a decode server is listed twice: {urls}")
        return urls

    @model_validator(mode="after")
    def _check_mode(self) -> RouterSettings:
        if not self.pd_disaggregation:
            raise _invalid(
                "--pd-disaggregation is required: pdcore router only routes between prefill "
                "and decode servers (or set PDCORE_ROUTER_PD_DISAGGREGATION=1)"
            )
        if not self.prefill:
            raise _invalid(
                "--prefill is missing: give at least one prefill server, "
                "--prefill URL [BOOTSTRAP_PORT] (or set PDCORE_ROUTER_PREFILL)"
            )
        if not self.decode:
            raise _invalid(
                "--decode is missing: give at least one decode server, --decode URL "
                "(or set PDCORE_ROUTER_DECODE)"
            )
        return self


def _help(name: str) -> str:
    field = RouterSettings.model_fields[name]
    note = f"env: {', '.join(env_names(RouterSettings, name))}"
    return f"{field.description} [{note}]".replace("%", "%%")


def add_router_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """SGLang's router flags on `parser`: the worker flags, then one per RouterOptions field."""
    group = parser.add_argument_group("PD workers")
    suppress: dict[str, Any] = {"default": argparse.SUPPRESS}
    group.add_argument(
        "--pd-disaggregation", action="store_true", help=_help("pd_disaggregation"), **suppress
    )
    group.add_argument(
        "--prefill",
        action="append",
        nargs="+",
        metavar=("URL", "BOOTSTRAP_PORT"),
        help=_help("prefill"),
        **suppress,
    )
    group.add_argument(
        "--decode", action="append", nargs="+", metavar="URL", help=_help("decode"), **suppress
    )
    return build_parser(RouterOptions, parser)


def parse_router_args(argv: Sequence[str] | None = None) -> RouterSettings:
    """Settings for `pdcore router` from `argv`, env vars and defaults; exits on bad values."""
    parser = add_router_arguments(new_parser("pdcore router"))
    return settings_or_exit(RouterSettings, parser.parse_args(argv), parser)
