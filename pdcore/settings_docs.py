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


def update_doc(text: str) -> str:
    """Replace each `<!-- BEGIN <Model> -->...<!-- END <Model> -->` block with the table."""
    for model_name, model_cls in DOC_MODELS.items():
        begin, end = f"<!-- BEGIN {model_name} -->\n", f"<!-- END {model_name} -->"
        head, sep, rest = text.partition(begin)
        if sep:
            _, sep2, tail = rest.partition(end)
            if sep2:
                text = head + begin + render_settings_table(model_cls) + end + tail
    return text


if __name__ == "__main__":  # python -m pdcore.settings_docs docs/configuration.md
    import sys

    path = sys.argv[1]
    with open(path, encoding="utf-8") as f:
        new = update_doc(f.read())
    with open(path, "w", encoding="utf-8") as f:
        f.write(new)
