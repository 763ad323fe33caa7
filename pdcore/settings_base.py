"""How a settings model becomes CLI flags, env vars, --help text and a docs table.

Generic on purpose: every settings model (server, router, disaggregation, ...) derives from
`PdcoreSettings` and gets the same behaviour. Each field is a flag (`--kebab-case`) and an
env var (`PDCORE_UPPER_CASE`, plus any SGLang-era alias the field declares); a flag beats an
env var beats the default, and an invalid value is reported against the flag (and the env
var it came from) before anything heavy starts.
"""

from __future__ import annotations

import argparse
import os
import types
from collections.abc import Sequence
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import pydantic
import pydantic_settings
from pydantic import JsonValue
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

S = TypeVar("S", bound=BaseSettings)


def setting(
    default: Any,
    description: str,
    *,
    flags: Sequence[str] = (),
    env_aliases: Sequence[str] = (),
    registry: str | None = None,
    **constraints: Any,
) -> Any:
    """A field with the metadata the CLI needs: extra `flags` (e.g. SGLang's `--model`),
    extra env var names (e.g. `SGLANG_...` for users moving over), and the plugin
    `registry` kind whose names the value must be one of."""
    items: dict[str, JsonValue] = {
        "flags": list(flags),
        "env_aliases": list(env_aliases),
        "registry": registry,
    }
    extra: dict[str, JsonValue] = {k: v for k, v in items.items() if v}
    return pydantic.Field(default, description=description, json_schema_extra=extra, **constraints)


def _extra(field: FieldInfo, key: str) -> Any:
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    return extra.get(key)


class _EnvAliasSource(PydanticBaseSettingsSource):
    """Reads a field's `env_aliases`; ranked below the PDCORE_ variables."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        for env in _extra(field, "env_aliases") or ():
            if env in os.environ:
                return os.environ[env], env, self.field_is_complex(field)
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for name, field in self.settings_cls.model_fields.items():
            value, env, is_complex = self.get_field_value(field, name)
            if value is not None:
                data[name] = self.decode_complex_value(env, field, value) if is_complex else value
        return data


class PdcoreSettings(BaseSettings):
    """Base of every pdcore settings model: PDCORE_ env prefix, unknown keys refused."""

    model_config = SettingsConfigDict(
        env_prefix="PDCORE_", extra="forbid", validate_assignment=True, protected_namespaces=()
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _EnvAliasSource(settings_cls))


# --- flags and env vars from a model ------------------------------------------------------


class InvalidSettingsError(ValueError):
    """A setting is invalid; the message names the flag (and env var) to fix."""


def flag_names(name: str, field: FieldInfo) -> list[str]:
    return ["--" + name.replace("_", "-"), *(_extra(field, "flags") or ())]


def env_names(model_cls: type[BaseSettings], name: str) -> list[str]:
    prefix = model_cls.model_config.get("env_prefix", "")
    field = model_cls.model_fields[name]
    return [(prefix + name).upper(), *(_extra(field, "env_aliases") or ())]


def _strip_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


_METAVARS: dict[Any, str] = {int: "INT", float: "FLOAT", str: "TEXT"}


def build_parser(
    model_cls: type[BaseSettings], parser: argparse.ArgumentParser, *, title: str | None = None
) -> argparse.ArgumentParser:
    """Add one flag per field of `model_cls` to `parser`, in an argument group.

    Values stay strings and are validated by pydantic, so a bad flag and a bad env var give
    the same message. Defaults are SUPPRESS, so only flags actually given reach the model
    and env vars keep working for the rest.
    """
    group = parser.add_argument_group(title or model_title(model_cls))
    for name, field in model_cls.model_fields.items():
        kind = _strip_optional(field.annotation)
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS}
        if kind is bool:
            kwargs["action"] = "store_true" if not field.default else argparse.BooleanOptionalAction
        elif get_origin(kind) is Literal:
            kwargs["choices"] = list(get_args(kind))
            kwargs["type"] = type(kwargs["choices"][0])
        else:
            kwargs["metavar"] = _METAVARS.get(kind, "VALUE")
            if get_origin(kind) is list:
                kwargs["nargs"] = "+"
        note = f"env: {', '.join(env_names(model_cls, name))}"
        if field.default is not None:
            note += f"; default: {'off' if field.default is False else field.default}"
        kwargs["help"] = f"{field.description or ''} [{note}]".replace("%", "%%")
        group.add_argument(*flag_names(name, field), **kwargs)
    return parser


def model_title(model_cls: type[BaseSettings]) -> str:
    """The first line of the model's docstring: its --help section and docs heading."""
    return (model_cls.__doc__ or model_cls.__name__).strip().splitlines()[0].rstrip(".")


def _source(model_cls: type[BaseSettings], name: str, explicit: set[str]) -> str:
    flag = flag_names(name, model_cls.model_fields[name])[0]
    if name in explicit:
        return flag
    environ = {k.upper() for k in os.environ}
    env = next((e for e in env_names(model_cls, name) if e.upper() in environ), None)
    return f"{flag} (env {env})" if env else flag


def settings_from_args(
    model_cls: type[S], namespace: argparse.Namespace, *, check_plugins: bool = True
) -> S:
    """Build `model_cls` from the flags given in `namespace` plus the environment.

    Raises `InvalidSettingsError` naming the flag (and the env var when the value came from
    there). With `check_plugins`, fields tied to a plugin registry must name an installed,
    available plugin -- checked here so a typo fails before any model is loaded.
    """
    given = {n: getattr(namespace, n) for n in model_cls.model_fields if hasattr(namespace, n)}
    try:
        settings = model_cls(**given)
    except pydantic.ValidationError as exc:
        msgs = []
        for err in exc.errors():
            loc, msg = err["loc"], str(err["msg"]).removeprefix("Value error, ")
            if loc and loc[0] in model_cls.model_fields:
                msgs.append(f"{_source(model_cls, str(loc[0]), set(given))}: {msg}")
            else:
                msgs.append(msg)
        raise InvalidSettingsError("; ".join(msgs)) from exc
    except pydantic_settings.SettingsError as exc:  # an env var that is not valid JSON
        raise InvalidSettingsError(str(exc)) from exc
    if check_plugins:
        _check_plugin_fields(model_cls, settings, set(given))
    return settings


def _check_plugin_fields(model_cls: type[BaseSettings], settings: Any, given: set[str]) -> None:
    from pdcore.plugins import PluginError, get_registry

    for name, field in model_cls.model_fields.items():
        kind = _extra(field, "registry")
        if kind and getattr(settings, name) is not None:  # None: an optional plugin unset
            try:
                get_registry(kind).require(getattr(settings, name))
            except PluginError as exc:
                raise InvalidSettingsError(f"{_source(model_cls, name, given)}: {exc}") from exc


def settings_or_exit(
    model_cls: type[S], namespace: argparse.Namespace, parser: argparse.ArgumentParser
) -> S:
    """`settings_from_args`, turning an error into `prog: error: --flag: reason`, exit 2."""
    try:
        return settings_from_args(model_cls, namespace)
    except InvalidSettingsError as exc:
        parser.error(str(exc))


def new_parser(prog: str, description: str | None = None) -> argparse.ArgumentParser:
    """A parser for a settings-driven command. The short usage line keeps an error visible
    instead of burying it under every flag; no abbreviations, since with flags added over
    time `--mod` would change meaning."""
    return argparse.ArgumentParser(
        prog=prog, usage="%(prog)s [options]", description=description, allow_abbrev=False
    )


def render_settings_table(model_cls: type[BaseSettings]) -> str:
    """The Markdown table of `model_cls` that docs/configuration.md embeds verbatim."""
    rows = ["| Flag | Env var | Values | Default | Description |", "|---|---|---|---|---|"]
    for name, field in model_cls.model_fields.items():
        kind = _strip_optional(field.annotation)
        if get_origin(kind) is Literal:
            values = ", ".join(f"`{v}`" for v in get_args(kind))
        else:
            values = "flag" if kind is bool else getattr(kind, "__name__", str(kind))
        flags = ", ".join(f"`{f}`" for f in flag_names(name, field))
        envs = ", ".join(f"`{e}`" for e in env_names(model_cls, name))
        default = f"`{field.default}`"
        if field.default is None or field.default is False:
            default = "unset" if field.default is None else "off"
        desc = (field.description or "").replace("|", "\\|")
        rows.append(f"| {flags} | {envs} | {values} | {default} | {desc} |")
    return "\n".join(rows) + "\n"
