"""The seam between the engine loop and a disaggregation mode (DESIGN.md §2).

One engine loop serves every mode; a pipeline object decides where a new request goes,
advances its own queues once per iteration (non-blocking polls), and may take over a
request whose prompt was just computed. Unified mode needs none of that: this base class
is the unified pipeline. The prefill and decode pipelines live in pdcore/disagg/.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pdcore.engine.request import Request

if TYPE_CHECKING:
    from pdcore.engine.core import EngineCore


@dataclass(frozen=True)
class BootstrapInfo:
    """Where a PD request's KV comes from or goes to, as the router sent it (DESIGN.md §5)."""

    host: str | None
    port: int | None
    room: int | None

    @classmethod
    def from_message(cls, data: dict[str, Any] | None) -> BootstrapInfo | None:
        if not data or data.get("room") is None:
            return None
        port = data.get("port")
        return cls(data.get("host"), None if port is None else int(port), int(data["room"]))


class Pipeline:
    """Unified mode: every request is prefilled and decoded here."""

    mode = "null"

    def __init__(self, core: EngineCore) -> None:
        self.core = core

    def add(self, req: Request, bootstrap: BootstrapInfo | None) -> None:
        self.core.scheduler.add(req)

    def advance(self) -> None:
        """Poll this mode's queues without blocking; may finish or hand over requests."""

    def after_prefill(self, req: Request, logprob: float | None) -> bool:
        """The prompt's KV is complete and its first token sampled. True = the pipeline
        took the request out of the scheduler (its pages stay held)."""
        return False

    def abort(self, req: Request, message: str) -> bool:
        """Drop a request this pipeline holds in its own queues; False if it holds none."""
        return False

    def num_queued(self) -> int:
        """Requests in this pipeline's own queues (not the scheduler's)."""
        return 0

    def queue_sizes(self) -> dict[str, int]:
        return {}

    def metrics(self, drain_samples: bool = False) -> dict[str, Any]:
        """Transfer counters; latency samples only with `drain_samples` (for /metrics)."""
        return {}

    def close(self) -> None:
        pass
