"""pdcore's no-op KV transfer backend (`--disaggregation-transfer-backend fake`).

It moves no bytes, so decode runs on whatever its pages held: the tokens are meaningless.
It exists to debug the PD pipelines and the control plane on one node without a transfer
library. Only the hook lives here; the backend is imported when selected.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pdcore import hookimpl
from pdcore.hookspecs import Register

if TYPE_CHECKING:
    from pd_fake.backend import FakeBackend
    from pdcore.disagg.transfer import TransferConfig


def create(config: TransferConfig) -> FakeBackend:
    from pd_fake.backend import FakeBackend

    return FakeBackend(config)


@hookimpl
def pdcore_register_transfer_backends(register: Register) -> None:
    register(
        "fake",
        create,
        description="moves nothing, reports done at once: meaningless tokens, for debugging",
    )
