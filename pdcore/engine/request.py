"""A request's life inside the engine: its tokens, its pages, and how far its KV is computed."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field, fields
from typing import Any

from pdcore.engine.detokenizer import IncrementalDetokenizer
from pdcore.engine.sampling_params import SamplingParams


class RequestError(ValueError):
    """A request the engine refuses (empty or too long prompt, duplicate id); user-facing text."""


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestOutput:
    """What one engine step produced for one request (a delta, not the whole output)."""

    rid: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: dict[str, Any] | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    new_logprobs: list[float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "rid": self.rid,
            "new_token_ids": self.new_token_ids,
            "new_text": self.new_text,
            "finished": self.finished,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "new_logprobs": self.new_logprobs,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RequestOutput:
        """The inverse of `to_dict` (keys it does not write are ignored)."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


@dataclass(eq=False)
class Request:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    return_logprob: bool = False
    arrival_time: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    pages: list[int] = field(default_factory=list)
    page_hashes: list[int] = field(default_factory=list)  # chain hashes of published full pages
    num_computed: int = 0  # tokens whose KV is in the pool
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    finish_reason: dict[str, Any] | None = None
    max_len: int = 0  # context limit for this request's sequence
    # Reported but not yet sent to the caller:
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[float] = field(default_factory=list)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids if self.output_ids else self.prompt_ids

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def take_output(self) -> RequestOutput:
        """Collect what happened since the last report."""
        text = self.detokenizer.take_text(final=self.finished)
        out = RequestOutput(
            rid=self.rid,
            new_token_ids=self.pending_ids,
            new_text=text,
            finished=self.finished,
            finish_reason=self.finish_reason,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.output_ids),
            cached_tokens=self.cached_tokens,
            new_logprobs=self.pending_logprobs if self.return_logprob else None,
        )
        self.pending_ids = []
        self.pending_logprobs = []
        return out
