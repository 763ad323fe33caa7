"""The KVPoll states a sender or receiver reports to the engine pipelines.

The numbering is SGLang's, so logs and metrics read the same to users moving over.
"""

from __future__ import annotations

import enum
from typing import Any


class KVPoll(enum.IntEnum):
    """Where one room's KV handoff stands; Failed and Success are final."""

    Failed = 0
    Bootstrapping = 1
    WaitingForInput = 2
    Transferring = 3
    Success = 4

    @property
    def finished(self) -> bool:
        return self in (KVPoll.Failed, KVPoll.Success)


def pd_failure(message: str) -> dict[str, Any]:
    """finish_reason of a request PD could not serve; the HTTP layer turns it into a 5xx.
    Shared by both pipelines so a client sees one shape whichever side failed."""
    return {"type": "abort", "message": message, "status_code": 502}


def overloaded(message: str) -> dict[str, Any]:
    """finish_reason of a request refused for want of capacity (the KV pool stayed full):
    a 503, which a router or client may retry elsewhere or later."""
    return {"type": "abort", "message": message, "status_code": 503}
