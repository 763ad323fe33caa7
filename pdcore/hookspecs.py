"""The whole plugin contract of pdcore, in one file.

A plugin author needs to read only this module and docs/plugins.md. Every backend the core
uses -- including the core's own built-ins (`pdcore.builtins`) -- arrives through these
hooks, so there is exactly one way anything is found.

Two families of hooks:

* **Registration hooks** (register-callback style): the core calls the hook once with a
  `register` callback and the plugin calls `register(name, factory, ...)` for each thing it
  offers. Factories are called only when a thing is selected, so a plugin module stays cheap
  to import and `pdcore plugins` can list a backend whose heavy library is missing.
* **Observation hooks**: the core reports events (a request finished, a KV transfer
  finished) so third parties can add metrics or logging without touching the core. They
  return nothing and must be quick; an exception in one is logged, never fatal.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol, TypeVar

import pluggy

PROJECT_NAME = "pdcore"

hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
"""Decorate a plugin's hook functions with this (re-exported as `pdcore.hookimpl`)."""

_hookspec = pluggy.HookspecMarker(PROJECT_NAME)

_F = TypeVar("_F", bound=Callable[..., Any])


def _spec(func: _F) -> _F:
    """Mark a hook spec while keeping its real signature visible to type checkers.

    `HookspecMarker.__call__` is typed loosely; wrapping it (as tox does) means a call such
    as `pm.hook.pdcore_request_finished(info=...)` is still checked against the spec below.
    """
    return _hookspec(func)


class Register(Protocol):
    """The callback handed to every registration hook.

    `factory(**kwargs)` builds the object; it should import heavy libraries inside its body.
    `factory` may also be a "package.module:attribute" string, imported on first use.
    `check()` returns None when the thing can run here, or a short reason when it cannot
    (e.g. "mooncake-transfer-engine not installed"); it is called at most once, lazily.
    Registering a name that another plugin already registered for the same kind is an error.
    """

    def __call__(
        self,
        name: str,
        factory: Callable[..., Any] | str,
        *,
        description: str = "",
        check: Callable[[], str | None] | None = None,
    ) -> None: ...


class RegisterSettings(Protocol):
    """The callback handed to `pdcore_register_settings`: `register(Model)`, where `Model`
    is a `pdcore.settings_base.PdcoreSettings` subclass."""

    def __call__(self, model: type[Any]) -> None: ...


# --- registration hooks -------------------------------------------------------------------


@_spec
def pdcore_register_transfer_backends(register: Register) -> None:
    """Offer KV transfer backends (the data plane: register memory, connect, write, poll).

    The control plane (bootstrap, handshake, timeouts, abort) is shared in `pdcore.disagg`,
    so a backend only moves bytes; see docs/plugins.md for the interface it implements.
    """


@_spec
def pdcore_register_attention_backends(register: Register) -> None:
    """Offer attention kernels (paged prefill/extend and decode) selected by
    `--attention-backend`. The factory receives the engine's kwargs for the backend."""


@_spec
def pdcore_register_schedule_policies(register: Register) -> None:
    """Offer policies that order the waiting queue, selected by `--schedule-policy`."""


@_spec
def pdcore_register_routing_policies(register: Register) -> None:
    """Offer policies the PD router uses to pick a prefill/decode pair for a request.

    Called in the router process, which never imports torch: keep the plugin module light.
    """


@_spec
def pdcore_register_settings(register: RegisterSettings) -> None:
    """Offer the plugin's settings: `register(Model)` for each `PdcoreSettings` model.

    Each field becomes a `pdcore serve` flag (one --help section per plugin) and env vars
    (PDCORE_<FIELD>, plus the field's `env_aliases`, e.g. SGLang's names); every plugin's
    settings are validated at flag parsing, before any model loads, and docs/configuration.md
    lists them. A flag given on the command line is exported to the environment as its
    PDCORE_ variable, so the plugin reads its settings with `Model()` wherever it runs (the
    engine process included). Keep the model's module light: no transfer library imports.
    Field names are shared with pdcore's own flags: one already taken is an error.
    """


@_spec
def pdcore_kv_pool_allocation(device: Any) -> AbstractContextManager[None] | None:
    """A context manager under which the engine allocates its KV cache on `device` (a
    torch.device), or None. For transports that can move only memory from their own
    allocator (Mooncake's NVLINK/BAREX pools); pdcore enters every one returned.
    """


# --- observation hooks --------------------------------------------------------------------


@_spec
def pdcore_request_finished(info: dict[str, Any]) -> None:
    """A request left the engine (finished, aborted or failed).

    `info` is a plain dict so that new keys never break a plugin. Keys the core provides:
    `rid`, `disaggregation_mode`, `prompt_tokens`, `completion_tokens`, `cached_tokens`,
    `finish_reason` (dict), `e2e_latency_s`; unknown keys must be ignored.
    """


@_spec
def pdcore_kv_transfer_finished(info: dict[str, Any]) -> None:
    """A KV cache transfer for one request ended (on the side that observed the end).

    Keys the core provides: `rid`, `bootstrap_room`, `backend`, `role` ("prefill" or
    "decode"), `success` (bool), `bytes`, `latency_s`, `error` (str or None); unknown keys
    must be ignored.
    """
