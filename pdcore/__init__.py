"""pdcore: LLM serving with prefill/decode disaggregation.

Kept tiny on purpose: the router imports this package and must never pull in torch, so
`Engine` is resolved lazily on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pdcore.hookspecs import hookimpl

if TYPE_CHECKING:
    from pdcore.offline import Engine

__version__ = "0.1.0"
__all__ = ["Engine", "__version__", "hookimpl"]


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from pdcore.offline import Engine

        return Engine
    raise AttributeError(f"module 'pdcore' has no attribute {name!r}")
