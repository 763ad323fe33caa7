"""A transfer backend that moves nothing: every batch is done as soon as its notification is
handed to the peer, over pdcore's zmq side channel on `config.host`.

Everything but the (absent) data movement is `ChannelBackend`'s, the same code the real
channel backends run: runs are checked against both sides' registered memory, so a
control-plane bug (a page outside the pool, a batch spanning devices) shows up on one node
just as it would with a real transport; a dead or absent peer leaves the notification
unsent, and a batch pending past `config.timeout_s` is failed.
"""

from __future__ import annotations

from pdcore.disagg.channel_backend import ChannelBackend, PeerBlob
from pdcore.disagg.transfer import DONE, TRANSFER_CONTRACT_VERSION, BatchState, RunArray


class FakeBackend(ChannelBackend[None, None]):
    """See the module docstring: a peer needs nothing but its inbox, a write is done at once."""

    contract_version = TRANSFER_CONTRACT_VERSION
    moves_bytes = False  # the conformance kit skips its byte checks for this backend
    blob_tag = "pd-fake"
    blob_version = 2  # 1 named the inbox "endpoint"

    def _open_peer(self, peer_id: str, blob: PeerBlob) -> None:
        return None

    def _start_write(self, peer: None, runs: RunArray) -> None:
        return None

    def _write_state(self, write: None) -> BatchState:
        return DONE
