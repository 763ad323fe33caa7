"""Typed registries of named factories, filled by plugins through registration hooks.

A registry maps a name ("torch", "mooncake", "fcfs") to a lazy factory plus the plugin that
offered it. Nothing heavy runs until `create()`, and availability (`check()`) is asked only
when someone needs to know, so listing every installed backend stays cheap and works where
a backend's library is missing. Errors name what to fix: the unknown name, what is
installed, and why an installed thing cannot run here.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")

# kind -> (label used in messages, registration hook that fills it)
KINDS: dict[str, tuple[str, str]] = {
    "transfer_backend": ("transfer backend", "pdcore_register_transfer_backends"),
    "attention_backend": ("attention backend", "pdcore_register_attention_backends"),
    "schedule_policy": ("schedule policy", "pdcore_register_schedule_policies"),
    "routing_policy": ("routing policy", "pdcore_register_routing_policies"),
}


class PluginError(Exception):
    """A plugin is broken or misconfigured; the message says which and how to fix it."""


class UnknownPluginError(PluginError, LookupError):
    """No plugin registered the requested name; the message lists what is installed."""


class PluginUnavailableError(PluginError, RuntimeError):
    """The name is registered but cannot run here (its `check()` gave a reason)."""


@dataclass(frozen=True)
class PluginInfo:
    """One registered item as `describe()` and `pdcore plugins --json` report it."""

    kind: str
    name: str
    plugin: str
    description: str
    available: bool
    reason: str | None


def _resolve(factory: Callable[..., T] | str) -> Callable[..., T]:
    if callable(factory):
        return factory
    module_name, _, attr = factory.partition(":")
    try:
        resolved: Callable[..., T] = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise PluginError(f"factory {factory!r} cannot be loaded: {exc}") from exc
    return resolved


class _Entry(Generic[T]):
    __slots__ = ("name", "factory", "plugin", "description", "_check", "_reason", "_checked")

    def __init__(
        self,
        name: str,
        factory: Callable[..., T] | str,
        plugin: str,
        description: str,
        check: Callable[[], str | None] | None,
    ) -> None:
        self.name = name
        self.factory = factory
        self.plugin = plugin
        self.description = description
        self._check = check
        self._reason: str | None = None
        self._checked = check is None

    def unavailable_reason(self) -> str | None:
        """None when usable; computed once because a check may import a large library."""
        if not self._checked:
            assert self._check is not None
            try:
                self._reason = self._check()
            except Exception as exc:  # a crashing check means "not usable", with the cause
                self._reason = f"availability check failed: {type(exc).__name__}: {exc}"
            self._checked = True
        return self._reason


class Registry(Generic[T]):
    """Named factories of one kind (e.g. attention backends)."""

    def __init__(self, kind: str, label: str, load_errors: Mapping[str, str] | None = None):
        self.kind = kind
        self.label = label
        self._entries: dict[str, _Entry[T]] = {}
        self._load_errors = dict(load_errors or {})

    def register(
        self,
        name: str,
        factory: Callable[..., T] | str,
        *,
        description: str = "",
        check: Callable[[], str | None] | None = None,
        plugin: str = "<unknown>",
    ) -> None:
        """Add `name`; a second plugin registering the same name is an error, because
        silently picking one would make the selected backend depend on install order."""
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {plugin!r} registered a {self.label} with name {name!r}")
        if not callable(factory) and not (isinstance(factory, str) and ":" in factory):
            raise PluginError(
                f"plugin {plugin!r} registered {self.label} {name!r} with a factory "
                f"that is not callable (nor a 'module:attribute' reference): {factory!r}"
            )
        if check is not None and not callable(check):
            raise PluginError(f"plugin {plugin!r}: check for {self.label} {name!r} is not callable")
        old = self._entries.get(name)
        if old is not None:
            raise PluginError(
                f"{self.label} {name!r} is registered twice: by plugin {old.plugin!r} and by "
                f"plugin {plugin!r}; uninstall one or leave it out with PDCORE_PLUGINS"
            )
        self._entries[name] = _Entry(name, factory, plugin, description, check)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def describe(self) -> list[PluginInfo]:
        """Every item with the plugin that offered it and whether it can run here."""
        out = []
        for name in self.names():
            e = self._entries[name]
            reason = e.unavailable_reason()
            out.append(PluginInfo(self.kind, name, e.plugin, e.description, reason is None, reason))
        return out

    def require(self, name: str) -> None:
        """Raise unless `name` is registered and available; lets start-up fail before any
        model is loaded instead of half-way through."""
        entry = self._entries.get(name)
        if entry is None:
            raise UnknownPluginError(self.unknown_message(name))
        reason = entry.unavailable_reason()
        if reason is not None:
            raise PluginUnavailableError(
                f"{self.label} {name!r} (plugin {entry.plugin!r}) is unavailable: {reason}"
            )

    def create(self, name: str, **kwargs: Any) -> T:
        """Build the item: `factory(**kwargs)`, after `require(name)`."""
        self.require(name)
        return _resolve(self._entries[name].factory)(**kwargs)

    def unknown_message(self, name: str) -> str:
        parts = []
        for n in self.names():
            reason = self._entries[n].unavailable_reason()
            parts.append(n if reason is None else f"{n} (unavailable \u2014 {reason})")
        msg = f"unknown {self.label} {name!r}; "
        msg += f"installed: {', '.join(parts)}" if parts else "none installed"
        if self._load_errors:
            failed = ", ".join(f"{n} ({err})" for n, err in sorted(self._load_errors.items()))
            msg += f"; plugins that failed to load: {failed}"
        close = difflib.get_close_matches(name, self.names(), n=1)
        if close:
            msg += f"; did you mean {close[0]!r}?"
        return msg
