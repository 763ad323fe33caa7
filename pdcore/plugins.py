"""Find plugins and turn their registration hooks into typed registries.

Built-ins (`pdcore.builtins`) are registered first, exactly like a third-party plugin, then
every entry point of group "pdcore" is loaded, so there is one path by which anything is
found. Environment variables:

* `PDCORE_PLUGINS`: comma-separated entry-point names to load (built-ins always load);
  unset loads all, empty loads none -- which is how tests switch entry points off.
* `PDCORE_TRACE_HOOKS=1`: print every hook call to stderr, to debug a plugin.
"""

from __future__ import annotations

import difflib
import functools
import importlib.metadata
import logging
import os
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal, overload

import pluggy

from pdcore import hookspecs
from pdcore.registry import (
    KINDS,
    PluginError,
    PluginInfo,
    PluginUnavailableError,
    Registry,
    UnknownPluginError,
)

__all__ = [
    "BUILTIN_PLUGIN",
    "ENTRY_POINT_GROUP",
    "KINDS",
    "PdcorePluginManager",
    "PluginError",
    "PluginInfo",
    "PluginUnavailableError",
    "Registry",
    "UnknownPluginError",
    "build_plugin_manager",
    "describe_plugins",
    "get_plugin_manager",
    "get_registry",
    "notify",
    "plugin_settings_models",
    "reset_plugin_manager",
]

if TYPE_CHECKING:  # the contracts each registry holds; types only, no import at run time
    from pdcore.disagg.transfer import TransferBackend
    from pdcore.engine.schedule_policies import SchedulePolicy
    from pdcore.model.attention import AttentionBackend
    from pdcore.router.policies import RoutingPolicy

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "pdcore"
BUILTIN_PLUGIN = "pdcore.builtins"
ALLOW_ENV = "PDCORE_PLUGINS"
TRACE_ENV = "PDCORE_TRACE_HOOKS"


class PdcorePluginManager(pluggy.PluginManager):
    """A pluggy manager that also owns the registries built from its plugins.

    Registries are built per kind on first use and dropped whenever a plugin is registered
    or unregistered, so a test can add a plugin and immediately see what it offers.
    """

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT_NAME)
        self.add_hookspecs(hookspecs)
        self.load_errors: dict[str, str] = {}
        self._registries: dict[str, Registry[Any]] = {}

    def register(self, plugin: object, name: str | None = None) -> str | None:
        self._registries.clear()
        return super().register(plugin, name)

    def unregister(self, plugin: object | None = None, name: str | None = None) -> Any:
        self._registries.clear()
        return super().unregister(plugin, name)

    def check_pending(self) -> None:
        """Like pluggy's, but names the plugin, suggests the hook meant and says how to
        leave the plugin out."""
        try:
            super().check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(_explain_invalid(self, exc)) from exc

    @overload
    def registry(self, kind: Literal["transfer_backend"]) -> Registry[TransferBackend]: ...
    @overload
    def registry(self, kind: Literal["attention_backend"]) -> Registry[AttentionBackend]: ...
    @overload
    def registry(self, kind: Literal["schedule_policy"]) -> Registry[SchedulePolicy]: ...
    @overload
    def registry(self, kind: Literal["routing_policy"]) -> Registry[RoutingPolicy]: ...
    @overload
    def registry(self, kind: str) -> Registry[Any]: ...
    def registry(self, kind: str) -> Registry[Any]:
        """The registry of `kind`, filled by calling each plugin's registration hook. Typed
        per kind, so `create()` returns the contract's type (a transfer backend, ...)."""
        if kind not in KINDS:
            raise ValueError(f"unknown plugin kind {kind!r}; kinds: {', '.join(KINDS)}")
        reg = self._registries.get(kind)
        if reg is None:
            self.check_pending()
            reg = self._build_registry(kind)
            self._registries[kind] = reg
        return reg

    def _build_registry(self, kind: str) -> Registry[Any]:
        label, hook_name = KINDS[kind]
        reg: Registry[Any] = Registry(kind, label, load_errors=self.load_errors)
        hook = getattr(self.hook, hook_name)
        plugins = self.get_plugins()
        # One call per plugin, so each registered item knows which plugin offered it.
        for impl in hook.get_hookimpls():
            others = [p for p in plugins if p is not impl.plugin]
            caller = self.subset_hook_caller(hook_name, remove_plugins=others)
            register = functools.partial(reg.register, plugin=impl.plugin_name)
            try:
                caller(register=register)
            except PluginError:
                raise
            except Exception as exc:
                raise PluginError(
                    f"plugin {impl.plugin_name!r} failed in {hook_name}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
        return reg


def _explain_invalid(pm: pluggy.PluginManager, exc: pluggy.PluginValidationError) -> str:
    name = pm.get_name(exc.plugin) or repr(exc.plugin)
    msg = f"plugin {name!r}: {exc}"
    bad = [n for n in vars(pm.hook) if not n.startswith("_") and not getattr(pm.hook, n).has_spec()]
    specs = [n for n in vars(hookspecs) if n.startswith("pdcore_")]
    for hook_name in bad:
        close = difflib.get_close_matches(hook_name, specs, n=1)
        if close:
            msg += f" (did you mean {close[0]!r}?)"
            break
    return msg + f"; fix the plugin or leave it out with {ALLOW_ENV}"


def _allowed_names() -> set[str] | None:
    raw = os.environ.get(ALLOW_ENV)
    if raw is None:
        return None
    return {n.strip() for n in raw.split(",") if n.strip()}


def _entry_point_names() -> list[str]:
    eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return list(dict.fromkeys(ep.name for ep in eps))


def _trace_before(
    hook_name: str, impls: Sequence[pluggy.HookImpl], kwargs: Mapping[str, Any]
) -> None:
    plugins = ", ".join(impl.plugin_name for impl in impls) or "no plugins"
    print(f"[pdcore hook] {hook_name}({', '.join(kwargs)}) -> {plugins}", file=sys.stderr)


def _trace_after(
    outcome: pluggy.Result[Any],
    hook_name: str,
    impls: Sequence[pluggy.HookImpl],
    kwargs: Mapping[str, Any],
) -> None:
    if outcome.exception is not None:
        print(f"[pdcore hook] {hook_name} raised {outcome.exception!r}", file=sys.stderr)


def build_plugin_manager(
    *, load_entry_points: bool = True, allow: Iterable[str] | None = None
) -> PdcorePluginManager:
    """Build a fresh manager: built-ins, then entry points (those in `allow`, or those in
    `PDCORE_PLUGINS` when `allow` is None, or all when that is unset too).

    A plugin that fails to import is recorded in `load_errors` and reported by
    `pdcore plugins` rather than breaking every command; a plugin whose hooks do not match
    the specs raises `PluginError`, because it would otherwise silently do nothing.
    """
    from pdcore import builtins

    pm = PdcorePluginManager()
    if os.environ.get(TRACE_ENV, "").lower() not in ("", "0", "false", "no"):
        pm.add_hookcall_monitoring(_trace_before, _trace_after)
    pm.register(builtins, name=BUILTIN_PLUGIN)
    if load_entry_points:
        allowed = set(allow) if allow is not None else _allowed_names()
        names = _entry_point_names()
        for name in names:
            if allowed is not None and name not in allowed:
                continue
            try:
                pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=name)
            except pluggy.PluginValidationError as exc:
                raise PluginError(_explain_invalid(pm, exc)) from exc
            except Exception as exc:
                pm.load_errors[name] = f"{type(exc).__name__}: {exc}"
                logger.warning("pdcore plugin %r failed to load: %s", name, pm.load_errors[name])
        for missing in sorted((allowed or set()) - set(names)):
            logger.warning("%s names %r, but no such plugin is installed", ALLOW_ENV, missing)
    pm.check_pending()
    return pm


_lock = threading.Lock()
_manager: PdcorePluginManager | None = None


def get_plugin_manager() -> PdcorePluginManager:
    """The process-wide manager, built on first use from the environment."""
    global _manager
    with _lock:
        if _manager is None:
            _manager = build_plugin_manager()
        return _manager


def reset_plugin_manager(pm: PdcorePluginManager | None = None) -> None:
    """Drop the cached manager (or install `pm` as it), so tests can change the environment
    or plugins and start over."""
    global _manager
    with _lock:
        _manager = pm


@overload
def get_registry(kind: Literal["transfer_backend"]) -> Registry[TransferBackend]: ...
@overload
def get_registry(kind: Literal["attention_backend"]) -> Registry[AttentionBackend]: ...
@overload
def get_registry(kind: Literal["schedule_policy"]) -> Registry[SchedulePolicy]: ...
@overload
def get_registry(kind: Literal["routing_policy"]) -> Registry[RoutingPolicy]: ...
@overload
def get_registry(kind: str) -> Registry[Any]: ...
def get_registry(kind: str) -> Registry[Any]:
    """The registry of `kind` ("transfer_backend", "attention_backend", "schedule_policy",
    "routing_policy") from the process-wide manager."""
    return get_plugin_manager().registry(kind)


def notify(hook_name: str, info: dict[str, Any], pm: PdcorePluginManager | None = None) -> None:
    """Call an observation hook. Each observer runs on its own, so a failing one is logged
    and skipped and can never break serving or starve the other observers."""
    pm = pm or get_plugin_manager()
    impls = getattr(pm.hook, hook_name).get_hookimpls()
    for impl in reversed(impls):  # pluggy's own call order: last registered first
        try:
            impl.function(info=info)
        except Exception:
            logger.exception("pdcore plugin %r failed in %s", impl.plugin_name, hook_name)


@dataclass(frozen=True)
class PluginSettingsModel:
    """One settings model a plugin offered through `pdcore_register_settings`."""

    plugin: str
    """The plugin's name (its entry point name, e.g. "mooncake")."""
    package: str
    """The distribution that installed it, e.g. "pd-mooncake"."""
    model: type[Any]
    """The `PdcoreSettings` subclass."""


def plugin_settings_models(pm: PdcorePluginManager | None = None) -> list[PluginSettingsModel]:
    """Every plugin's settings models, plugin by plugin (sorted by plugin name). Raises
    PluginError for something that is not a `PdcoreSettings` model, or a hook that fails."""
    from pdcore.settings_base import PdcoreSettings

    pm = pm or get_plugin_manager()
    pm.check_pending()
    hook_name = "pdcore_register_settings"
    dists = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    plugins = pm.get_plugins()
    found: list[PluginSettingsModel] = []
    for impl in pm.hook.pdcore_register_settings.get_hookimpls():
        dist = dists.get(id(impl.plugin))
        package = dist.project_name if dist else "pdcore"
        models: list[type[Any]] = []
        others = [p for p in plugins if p is not impl.plugin]
        try:
            pm.subset_hook_caller(hook_name, remove_plugins=others)(register=models.append)
        except Exception as exc:
            raise PluginError(
                f"plugin {impl.plugin_name!r} failed in {hook_name}: {type(exc).__name__}: {exc}"
            ) from exc
        for model in models:
            if not (isinstance(model, type) and issubclass(model, PdcoreSettings)):
                raise PluginError(
                    f"plugin {impl.plugin_name!r} registered {model!r} in {hook_name}: "
                    "expected a pdcore.settings_base.PdcoreSettings subclass"
                )
            found.append(PluginSettingsModel(impl.plugin_name, package, model))
    return sorted(found, key=lambda m: m.plugin)


def describe_plugins(pm: PdcorePluginManager | None = None) -> dict[str, Any]:
    """Everything `pdcore plugins` shows: each plugin, its package, hooks and offerings (with
    availability), plugins that failed to load, and registry errors such as duplicates."""
    pm = pm or get_plugin_manager()
    dists = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    provides: dict[str, list[dict[str, Any]]] = {}
    errors: list[str] = []
    for kind in KINDS:
        try:
            items = pm.registry(kind).describe()
        except PluginError as exc:
            errors.append(str(exc))
            continue
        for item in items:
            provides.setdefault(item.plugin, []).append(asdict(item))
    plugins = []
    for name, plugin in pm.list_name_plugin():
        dist = dists.get(id(plugin))
        plugins.append(
            {
                "name": name,
                "builtin": name == BUILTIN_PLUGIN,
                "package": dist.project_name if dist else "pdcore",
                "version": dist.version if dist else _pdcore_version(),
                "hooks": sorted(h.name for h in pm.get_hookcallers(plugin) or []),
                "provides": provides.get(name, []),
            }
        )
    failed = [{"name": n, "error": e} for n, e in sorted(pm.load_errors.items())]
    return {"plugins": plugins, "failed": failed, "errors": errors}


def _pdcore_version() -> str:
    from pdcore import __version__

    return __version__
