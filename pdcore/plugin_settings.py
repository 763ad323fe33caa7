"""Plugins' settings on the `pdcore serve` command line (hook `pdcore_register_settings`).

Each plugin's `PdcoreSettings` models become flags in a --help section of their own (with
their env names), are validated at flag parsing -- every plugin's, before any model loads --
and a flag given on the command line is exported as its PDCORE_ env var, which outranks the
field's other env names. A plugin reads its settings with `Model()` wherever it runs (the
engine process inherits the environment), so a flag and an env var reach it alike.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from pydantic_settings import BaseSettings

from pdcore.plugins import PluginError, PluginSettingsModel, plugin_settings_models
from pdcore.settings_base import (
    InvalidSettingsError,
    build_parser,
    env_names,
    model_title,
    settings_from_args,
)

__all__ = ["add_plugin_arguments", "plugin_section_title", "plugin_settings_or_exit"]


def plugin_section_title(entry: PluginSettingsModel) -> str:
    return f"Plugin {entry.plugin} ({entry.package}): {model_title(entry.model)}"


def _check_names(core: type[BaseSettings], entries: list[PluginSettingsModel]) -> None:
    """A plugin field may not reuse a name pdcore or another plugin already has."""
    owner = {name: "pdcore" for name in core.model_fields}
    for entry in entries:
        for name in entry.model.model_fields:
            if name in owner:
                raise PluginError(
                    f"plugin {entry.plugin!r} ({entry.package}) registers setting {name!r}, "
                    f"which {owner[name]} already has; rename the field"
                )
            owner[name] = f"plugin {entry.plugin!r}"


def add_plugin_arguments(
    parser: argparse.ArgumentParser, core: type[BaseSettings]
) -> list[PluginSettingsModel]:
    """Add every plugin's settings to `parser` (one argument group per plugin model)."""
    entries = plugin_settings_models()
    _check_names(core, entries)
    for entry in entries:
        build_parser(entry.model, parser, title=plugin_section_title(entry))
    return entries


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def plugin_settings_or_exit(
    namespace: argparse.Namespace, parser: argparse.ArgumentParser
) -> list[Any]:
    """Validate every plugin's settings (flags in `namespace`, then env vars); on an invalid
    value print one line -- `prog: error: --flag (env NAME): what is accepted` -- and exit 2.
    Flags given are exported to the environment (see the module docstring)."""
    try:
        entries = plugin_settings_models()
    except PluginError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    out: list[Any] = []
    for entry in entries:
        try:
            settings = settings_from_args(entry.model, namespace, check_plugins=False)
        except InvalidSettingsError as exc:
            parser.exit(2, f"{parser.prog}: error: {exc} [plugin {entry.plugin}]\n")
        for name in entry.model.model_fields:
            if hasattr(namespace, name):  # given as a flag: hand it on to the plugin
                os.environ[env_names(entry.model, name)[0]] = _env_value(getattr(settings, name))
        out.append(settings)
    return out
