"""The KVPoll states a sender or receiver reports to the engine pipelines.

The numbering is SGLang's, so logs and metrics read the same to users moving over.
"""

from __future__ import annotations

import enum


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
