"""The Mooncake data plane: pdcore's transfer contract on a `mooncake.engine.TransferEngine`.

One engine per backend, started in P2PHANDSHAKE mode (no etcd): a peer is named by the
"host:rpc_port" session id its engine listens on. Mooncake binds its RPC and TCP ports on
all interfaces (0.0.0.0), whatever `--host` says.

Each coalesced run is posted as its own one-run `batch_transfer_async_write` and polled
with `transfer_check_status`, at most MAX_RUNS_IN_FLIGHT at a time. Not one multi-run batch:
measured here (0.3.13.post1, TCP), the status of a multi-run batch turns "done" while later
runs are still in flight, which would let a notification overtake its data; one-run batches
report truthfully and cost no more (46 MB in 60 runs: ~1 GB/s either way).

Mooncake has no notification channel, so everything around the writes is pdcore's
`ChannelBackend`: the batch table, the notification pushed over zmq once `_write_state`
reports a batch's runs all complete (so a receiver never learns of a batch before its data),
the deadline (`config.timeout_s`), peers, release and close. Mooncake's own failures (a
refused connection, its MC_TRANSFER_TIMEOUT) fail the batch at once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pd_mooncake.settings import MooncakeSettings
from pdcore.disagg.channel_backend import ChannelBackend, PeerBlob, check_reachable
from pdcore.disagg.notify_channel import advertised_host
from pdcore.disagg.transfer import (
    DONE,
    PENDING,
    TRANSFER_CONTRACT_VERSION,
    BatchState,
    MemoryRegion,
    RunArray,
    TransferConfig,
    TransferError,
    failed,
)

logger = logging.getLogger(__name__)

_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_PROTOCOLS = {"NVLINK": "nvlink", "INTRA_NODE_NVLINK": "nvlink", "BAREX": "barex"}
MAX_RUNS_IN_FLIGHT = 512
"""Runs posted and not yet complete, per batch. Mooncake's TCP transport rejects requests
beyond its lane queue ("TCP lane queue-full rejection", seen here with 7,500 runs at once, a
batch that then never completed), so a larger batch is posted as earlier runs finish."""


@dataclass
class _Writes:
    """One batch's runs: runs[:posted] handed to Mooncake, `in_flight` its ids not yet done."""

    session: str
    runs: RunArray
    posted: int = 0
    in_flight: list[int] = field(default_factory=list)


def _import_engine() -> Any:
    try:
        from mooncake.engine import TransferEngine
    except Exception as exc:  # a broken install surfaces here, not deep in a request
        raise TransferError(
            "mooncake cannot be imported: install pd-mooncake[cpu] (CPU) or "
            f"pd-mooncake[cuda]: {type(exc).__name__}: {exc}"
        ) from exc
    return TransferEngine


def choose_protocol(custom_mem_pool: str, ib_device: str | None) -> tuple[str, str]:
    """(Mooncake protocol, device filter) from SGLang's settings: a custom memory pool picks
    its transport; an IB device that exists here picks RDMA; anything else is TCP."""
    if custom_mem_pool:
        return _PROTOCOLS[custom_mem_pool], ib_device or ""
    if ib_device:
        missing = [
            d
            for d in ib_device.split(",")
            if not os.path.exists(f"/sys/class/infiniband/{d.strip()}")
        ]
        if not missing:
            return "rdma", ib_device
        logger.warning(
            "--disaggregation-ib-device %s: no such RDMA device here (%s); Mooncake uses TCP",
            ib_device,
            ", ".join(missing),
        )
    return "tcp", ""


class MooncakeBackend(ChannelBackend[str, _Writes]):
    """See the module docstring. A peer is its Mooncake session id; the blob carries ours."""

    contract_version = TRANSFER_CONTRACT_VERSION
    blob_tag = "pd-mooncake"
    blob_schema = {"session": str}

    def __init__(self, config: TransferConfig, settings: MooncakeSettings | None = None) -> None:
        engine_cls = _import_engine()
        settings = settings or MooncakeSettings()
        self.protocol, device = choose_protocol(settings.mooncake_custom_mem_pool, config.ib_device)
        host = advertised_host(config.host)
        if config.host in _LOOPBACK:
            logger.warning(
                "Mooncake listens on all interfaces (0.0.0.0), not only on --host %s: "
                "anyone who can reach this machine can reach its transfer engine port",
                config.host,
            )
        self._engine = engine_cls()
        ret = self._engine.initialize(host, "P2PHANDSHAKE", self.protocol, device)
        if ret != 0:
            raise TransferError(
                f"Mooncake failed to start ({self.protocol}, device {device or 'any'}): "
                f"initialize returned {ret}"
            )
        self.session = f"{host}:{self._engine.get_rpc_port()}"
        self._registered: list[int] = []
        super().__init__(config)

    def _register(self, regions: Sequence[MemoryRegion]) -> None:
        for r in regions:
            ret = self._engine.register_memory(r.addr, r.length)
            if ret != 0:
                raise TransferError(f"Mooncake could not register {r}: returned {ret}")
            self._registered.append(r.addr)

    def _blob_fields(self) -> dict[str, Any]:
        return {"session": self.session}

    def _open_peer(self, peer_id: str, blob: PeerBlob) -> str:
        session: str = blob.fields["session"]
        # Mooncake connects lazily on the first write; refuse a dead peer now.
        check_reachable(peer_id, session, min(5.0, self.config.timeout_s))
        return session

    def _start_write(self, peer: str, runs: RunArray) -> _Writes:
        return _Writes(peer, runs)  # posted by _write_state, which every poll calls

    def _write_state(self, write: _Writes) -> BatchState:
        """Reap completed runs, post more up to MAX_RUNS_IN_FLIGHT."""
        still = []
        for mc in write.in_flight:
            status = self._engine.transfer_check_status(mc)
            if status < 0:
                what = "timed out in Mooncake" if status == -2 else "failed in Mooncake"
                return failed(f"a run {what} (status {status}; peer gone?)")
            if status == 0:
                still.append(mc)
        write.in_flight = still
        while write.posted < len(write.runs) and len(write.in_flight) < MAX_RUNS_IN_FLIGHT:
            local, remote, length = (int(x) for x in write.runs[write.posted])
            mc = self._engine.batch_transfer_async_write(write.session, [local], [remote], [length])
            if mc <= 0:  # Mooncake answers 0 (or < 0) when it cannot post, e.g. refused
                return failed(f"Mooncake could not post a run (returned {mc}; peer gone?)")
            write.posted += 1
            write.in_flight.append(mc)
        done = write.posted == len(write.runs) and not write.in_flight
        return DONE if done else PENDING

    # Release and close: runs not yet posted are dropped; Mooncake cannot cancel a posted one.

    def _close_transport(self, unfinished: list[_Writes]) -> None:
        for addr in self._registered:
            try:
                self._engine.unregister_memory(addr)
            except Exception as exc:
                logger.warning("Mooncake unregister failed: %s", exc)
        self._registered.clear()
        self._engine = None
