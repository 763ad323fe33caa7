"""Regenerate the settings tables the docs embed, from the settings models.

`python -m pdcore.settings_docs docs/configuration.md` (and docs/router.md) rewrites each
`<!-- BEGIN <Model> -->...<!-- END <Model> -->` block. Its own module because it names the
server's and the router's settings together, which neither of those layers may do.
"""

from __future__ import annotations

from pydantic_settings import BaseSettings

from pdcore.router.settings import RouterSettings
from pdcore.settings import ServerSettings
from pdcore.settings_base import render_settings_table

# Models whose tables the docs embed between BEGIN/END markers (docs/configuration.md;
# RouterSettings: docs/router.md).
DOC_MODELS: dict[str, type[BaseSettings]] = {
    "ServerSettings": ServerSettings,
    "RouterSettings": RouterSettings,
}


PLUGINS_BLOCK = "plugins"
"""`<!-- BEGIN plugins -->`: every installed plugin's settings (hook pdcore_register_settings)."""


def render_plugin_settings() -> str:
    """One section per plugin settings model: heading (as in --help) and table."""
    from pdcore.plugin_settings import plugin_section_title
    from pdcore.plugins import plugin_settings_models

    parts = [
        f"### {plugin_section_title(entry)}\n\n{render_settings_table(entry.model)}"
        for entry in plugin_settings_models()
    ]
    return "\n".join(parts)


def _replace_block(text: str, name: str, body: str) -> str:
    begin, end = f"<!-- BEGIN {name} -->\n", f"<!-- END {name} -->"
    head, sep, rest = text.partition(begin)
    if sep:
        _, sep2, tail = rest.partition(end)
        if sep2:
            text = head + begin + body + end + tail
    return text


def update_doc(text: str) -> str:
    """Replace each `<!-- BEGIN <Model> -->...<!-- END <Model> -->` block with the table,
    and a `<!-- BEGIN plugins -->` block with every plugin's settings."""
    for model_name, model_cls in DOC_MODELS.items():
        text = _replace_block(text, model_name, render_settings_table(model_cls))
    if f"<!-- BEGIN {PLUGINS_BLOCK} -->" in text:
        text = _replace_block(text, PLUGINS_BLOCK, render_plugin_settings())
    return text


if __name__ == "__main__":  # python -m pdcore.settings_docs docs/configuration.md
    import sys

    path = sys.argv[1]
    with open(path, encoding="utf-8") as f:
        new = update_doc(f.read())
    with open(path, "w", encoding="utf-8") as f:
        f.write(new)
