"""The seam between the engine loop and a disaggregation mode (DESIGN.md §2, §2a).

One engine loop serves every mode; a pipeline object decides where a new request goes,
advances its own queues once per iteration (non-blocking polls), and may take over a
request whose prompt was just computed. Unified mode needs none of that: `Pipeline` here
is the unified pipeline. The prefill and decode pipelines live in `pdcore.disagg`, which
sits above the engine: the engine never names it. Whoever starts an engine passes a
`PipelineFactory`; the pipeline it builds talks to the engine only through `PipelineHost`,
the short list of things a pipeline may ask of its engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pdcore.engine.request import Request
from pdcore.model.kv_pool import KVPool
from pdcore.model.parallel import TPGroup
from pdcore.model.pipeline_split import PipelineGrid


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


class PipelineHost(Protocol):
    """What a pipeline may ask of the engine that hosts it, and nothing more."""

    @property
    def page_size(self) -> int:
        """Tokens per KV page."""

    @property
    def kv_pool(self) -> KVPool:
        """The KV page pool, whose memory a PD pipeline registers with its transfer backend."""

    @property
    def tp_group(self) -> TPGroup:
        """This engine's TP group (it is rank 0); size 1 without tensor parallelism."""

    @property
    def kv_head_range(self) -> tuple[int, int]:
        """(first global KV head this rank's pool holds, the model's KV heads): what a PD
        side tells its peer so prefill and decode of different tp sizes can meet."""

    @property
    def pipeline_grid(self) -> PipelineGrid | None:
        """With --pp-size, the grid of stages x TP ranks this engine is world rank 0 of
        (each grid rank moves the KV of its own layers and heads); None without."""

    @property
    def layer_range(self) -> tuple[int, int]:
        """(first global layer this rank's pool holds, the model's layers)."""

    def admit(self, req: Request) -> None:
        """Queue the request for the scheduler: its prompt is computed here."""

    def detach(self, req: Request) -> None:
        """Take the request out of the scheduler; its pages stay held by the pipeline."""

    def drop(self, req: Request) -> None:
        """Take the request out of the scheduler wherever it is and free its pages."""

    def reserve_pages(self, count: int, in_flight: int) -> list[int] | None:
        """Pages for a prompt whose KV will arrive from elsewhere, or None while taking
        them would exceed the running-request limit (counting `in_flight` requests the
        pipeline already holds) or leave the running batch without a page to grow into."""

    def release_pages(self, pages: list[int]) -> None:
        """Give pages back that the pipeline held outside any request."""

    def finish_request(self, req: Request, reason: dict[str, Any]) -> None:
        """End a request from outside a forward pass; reported in the next step."""

    def start_decoding(self, req: Request, first_token: int, logprob: float | None) -> None:
        """A request whose prompt KV arrived joins the running batch with its first token."""


class Pipeline:
    """Unified mode: every request is prefilled and decoded here."""

    mode = "null"

    def __init__(self, host: PipelineHost) -> None:
        self.host = host

    def add(self, req: Request, bootstrap: BootstrapInfo | None) -> None:
        self.host.admit(req)

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

    def queue_sizes(self) -> dict[str, float]:
        return {}

    def transfers_by_rank(self) -> dict[int, int]:
        """PD with TP: KV transfers in flight into or out of each TP rank's pool."""
        return {}

    def metrics(self, drain_samples: bool = False) -> dict[str, Any]:
        """Transfer counters; latency samples only with `drain_samples` (for /metrics)."""
        return {}

    def close(self) -> None:
        pass


PipelineFactory = Callable[[PipelineHost], Pipeline]
"""Builds the pipeline of an engine from the engine's host interface (unified: `Pipeline`)."""
