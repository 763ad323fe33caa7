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


def _prefill_item(item: Any) -> PrefillWorker:
    if isinstance(item, PrefillWorker):
        return item
    if isinstance(item, dict):
        item = [item.get("url"), item.get("bootstrap_port")]
    elif isinstance(item, str):
        item = item.split()
    if not isinstance(item, (list, tuple)) or not 1 <= len(item) <= 2:
        raise _invalid(f"takes a URL and optionally a bootstrap port, got {item!r}")
    url = _check_url(item[0])
    port = _bootstrap_port(item[1] if len(item) > 1 else None, url)
    return PrefillWorker(url=url, bootstrap_port=port)


class RouterOptions(PdcoreSettings):
    """Router settings (pdcore router)."""

    model_config = SettingsConfigDict(env_prefix="PDCORE_ROUTER_")

    host: str = setting("127.0.0.1", "Address the router binds to.")
    port: int = setting(8000, "Port the router listens on.", ge=1, le=65535)
    policy: str = setting(
        "round_robin",
        "How a prefill/decode pair is picked for each request: an installed routing policy "
        "(pdcore plugins).",
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
    log_level: Literal["debug", "info", "warning", "error"] = setting("info", "Logging level.")


class RouterSettings(RouterOptions):
    """Router settings (pdcore router)."""

    pd_disaggregation: bool = setting(
        False, "Route each request to a prefill and a decode server (the only mode for now)."
    )
    prefill: Annotated[list[PrefillWorker], NoDecode] = setting(
        [],
        "A prefill server: `--prefill URL [BOOTSTRAP_PORT]`, repeated for each one. "
        "BOOTSTRAP_PORT is a port or `none` (the server's own --disaggregation-bootstrap-port, "
        "8998 by default). Env: JSON, or `URL [PORT],URL [PORT]`.",
    )
    decode: Annotated[list[str], NoDecode] = setting(
        [],
        "A decode server URL, `--decode URL`, repeated for each one. Env: JSON, or `URL,URL`.",
    )

    @field_validator("prefill", mode="before")
    @classmethod
    def _parse_prefill(cls, value: Any) -> list[PrefillWorker]:
        items = _split_env_list(value)
        if not isinstance(items, list):
            raise _invalid(f"expected a list of prefill servers, got {items!r}")
        return [_prefill_item(item) for item in items]

    @field_validator("decode", mode="before")
    @classmethod
    def _parse_decode(cls, value: Any) -> list[str]:
        items = _split_env_list(value)
        if not isinstance(items, list):
            raise _invalid(f"expected a list of decode server URLs, got {items!r}")
        flat: list[Any] = []
        for item in items:  # argparse gives one list per --decode
            flat.extend(item if isinstance(item, (list, tuple)) else [item])
        return [_check_url(url) for url in flat]

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
