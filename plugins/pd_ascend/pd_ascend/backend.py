"""The Ascend data plane: pdcore's transfer contract on memfabric-hybrid or on Mooncake's
Ascend transport (engines.py picks one as SGLang does).

The transport starts at the first `register_memory`, on the NPU the regions live on
("npu:N"): both transports must know their device when they initialize, and the regions are
where pdcore says it. Every region must be NPU memory on that one device.

Both transports write with a blocking `batch_transfer_sync_write`, so each batch runs on a
small thread pool (the engine loop never waits); each worker thread makes the NPU current
first. When a batch's writes have all returned 0 the data is in place; neither transport
has notifications, so the rest is pdcore's `ChannelBackend`: `poll` then pushes the
notification over its zmq side channel (a receiver never learns of a batch before its
data), and a batch still pending after `config.timeout_s` is reported failed. A blocking
write cannot be cancelled: its slices not yet written are skipped, the running one finishes.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

from pd_ascend.engines import (
    Engine,
    import_memfabric,
    import_mooncake,
    set_npu_device,
    start_engine,
)
from pd_ascend.settings import MOONCAKE, load_settings, mf_role
from pd_ascend.wire import (
    BLOB_TAG,
    PeerInfo,
    Region,
    Regions,
    check_peer_matches,
    decode_blob,
    encode_blob,
    parse_ascend_device,
    split_calls,
)
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


def npu_index_of(regions: Sequence[Region]) -> int:
    """The one NPU all these regions are on; TransferError for CPU memory or several NPUs."""
    kinds = {parse_ascend_device(r.device) for r in regions}
    if any(kind != "npu" for kind, _ in kinds):
        raise TransferError(
            "the ascend backend moves NPU memory (npu:N): a CPU KV pool is moved by the "
            "mooncake or nixl backend"
        )
    if len(kinds) != 1:
        raise TransferError(f"one ascend backend serves one NPU, got {sorted(kinds)}")
    return next(iter(kinds))[1]


@dataclass
class _Write:
    future: cf.Future[str | None]  # why the write failed, or None once it is in place
    cancel: threading.Event = field(default_factory=threading.Event)


class AscendBackend(ChannelBackend[str, _Write]):
    """See the module docstring. A peer is its transport session; its blob is wire.py's."""

    contract_version = TRANSFER_CONTRACT_VERSION
    blob_tag = BLOB_TAG
    region_table = Regions

    def __init__(self, config: TransferConfig) -> None:
        try:
            self.settings = load_settings()
        except ValueError as exc:
            raise TransferError(f"ascend backend: {exc}") from exc
        mooncake = self.settings.transport == MOONCAKE
        if mooncake:  # a missing or broken install fails here, not at the first request
            import_mooncake()
        else:
            import_memfabric()
        self.transport = self.settings.transport
        self.protocol = "ascend" if mooncake else self.settings.ascend_mf_transfer_protocol
        self.role = mf_role(self.settings.ascend_mf_role, config.local_id)
        self.host = advertised_host(config.host)
        self._engine: Engine | None = None
        self._pool: cf.ThreadPoolExecutor | None = None
        self._registered: list[int] = []
        super().__init__(config)

    # --- memory and peers ---------------------------------------------------------------

    def _register(self, regions: Sequence[MemoryRegion]) -> None:
        new = [Region.of(r) for r in regions]
        device = npu_index_of([*self._regions, *new])
        if self._engine is None:
            self._engine = start_engine(self.settings, self.host, device, self.role)
            self._pool = cf.ThreadPoolExecutor(
                self.settings.ascend_transfer_threads,
                thread_name_prefix="pd-ascend",
                initializer=set_npu_device,
                initargs=(device,),
            )
        for r in new:
            self._engine.register(r.addr, r.length)
            self._registered.append(r.addr)

    def _info(self) -> PeerInfo:
        if self._engine is None:
            raise TransferError(
                "register_memory() first: the transport starts on the NPU of the first region"
            )
        regions = cast(Regions, self._regions)  # region_table = Regions
        return PeerInfo(
            self.transport, self.protocol, self._engine.session, self._channel.endpoint, regions
        )

    def _blob(self) -> bytes:
        return encode_blob(self._info())

    def _parse(self, blob: bytes) -> PeerBlob:
        info = decode_blob(blob)
        return PeerBlob(info.notify, info.regions, {"info": info})

    def _open_peer(self, peer_id: str, blob: PeerBlob) -> str:
        info: PeerInfo = blob.fields["info"]
        with self._lock:
            check_peer_matches(self._info(), info, peer_id)
        # The transports connect lazily; refuse a dead peer now, at its inbox.
        check_reachable(peer_id, info.notify, min(5.0, self.config.timeout_s))
        return info.session

    # --- writes ---------------------------------------------------------------------------

    def _start_write(self, peer: str, runs: RunArray) -> _Write:
        assert self._pool is not None and self._engine is not None  # memory is registered
        cancel = threading.Event()
        return _Write(self._pool.submit(self._write, self._engine, peer, runs, cancel), cancel)

    @staticmethod
    def _write(engine: Engine, session: str, runs: RunArray, cancel: threading.Event) -> str | None:
        """Worker thread: every slice of runs, in order; why it failed, or None."""
        for part in split_calls(runs):
            if cancel.is_set():
                return "released before all runs were written"
            ret = engine.write(
                session, part[:, 0].tolist(), part[:, 1].tolist(), part[:, 2].tolist()
            )
            if ret != 0:
                return f"batch_transfer_sync_write to {session} returned {ret} ({len(part)} runs)"
        return None

    def _write_state(self, write: _Write) -> BatchState:
        if not write.future.done():
            return PENDING
        error = write.future.result()
        return failed(error) if error else DONE

    def _cancel_write(self, write: _Write) -> None:
        write.cancel.set()  # slices not yet written are skipped; a running one finishes
        write.future.cancel()

    def _close_transport(self, unfinished: list[_Write]) -> None:
        pool, engine = self._pool, self._engine
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
            futures = [w.future for w in unfinished]
            _, running = cf.wait(futures, timeout=min(10.0, self.config.timeout_s))
            if running:  # tearing the engine down under a blocked write could crash it
                logger.warning(
                    "%d ascend write(s) still blocked at close; engine left up", len(running)
                )
                engine = None
        if engine is not None:
            for addr in self._registered:
                try:
                    engine.unregister(addr)
                except Exception as exc:
                    logger.warning("ascend unregister failed: %s", exc)
            engine.close()
        self._registered.clear()
        self._engine = None
