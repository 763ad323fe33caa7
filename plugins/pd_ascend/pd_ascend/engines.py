"""The two Ascend transports behind one small interface, as SGLang chooses them.

- memfabric-hybrid (`memfabric_hybrid.TransferEngine`, default): initialize(store_url,
  session_id, role, device_id, data_op_type) against the config store at ASCEND_MF_STORE_URL;
  role "Prefill" or "Decode"; data path SDMA or DEVICE_RDMA (ASCEND_MF_TRANSFER_PROTOCOL).
- Mooncake's Ascend transport (`mooncake.engine.TransferEngine`, with
  ENABLE_ASCEND_TRANSFER_WITH_MOONCAKE=true): initialize("ip:port:npu_<phy id>",
  "P2PHANDSHAKE", "ascend", ""); peers name it "ip:rpc_port". Needs a Mooncake built with
  USE_ASCEND_DIRECT and the NPU set as current device before initialize.

Both write with `batch_transfer_sync_write(session, locals, remotes, lengths)`, which blocks
until the data is in place and returns 0 (SGLang's path for both). Written against
memfabric-hybrid 1.3.0's bindings and Mooncake's documented Python API; neither has run on
an NPU here (see README).
"""

from __future__ import annotations

import contextlib
import logging
import socket
from typing import Any, Protocol

from pd_ascend.settings import AscendSettings, mooncake_server_name
from pdcore.disagg.kv_runs import TransferError

logger = logging.getLogger(__name__)

HCCS_ALIGNMENT = 2 << 20
"""Mooncake's Ascend transport needs NPU memory registered at 2 MiB-aligned addresses for
HCCS (its docs); unaligned regions are registered anyway, with a warning."""


class Engine(Protocol):
    transport: str
    protocol: str
    session: str

    def register(self, addr: int, length: int) -> None: ...
    def write(self, session: str, local: list[int], remote: list[int], sizes: list[int]) -> int: ...
    def unregister(self, addr: int) -> None: ...
    def close(self) -> None: ...


def set_npu_device(index: int) -> None:
    """Make NPU `index` current in this thread (ACL's device context is per thread)."""
    try:
        import torch_npu
    except Exception as exc:  # ImportError, or OSError when CANN's libraries are missing
        raise TransferError(
            f"torch_npu cannot be imported ({type(exc).__name__}: {exc}); it needs CANN"
        ) from exc
    torch_npu.npu.set_device(f"npu:{index}")


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host if host not in ("", "*") else "0.0.0.0", 0))
        return int(s.getsockname()[1])


def import_memfabric() -> Any:
    try:
        import memfabric_hybrid
    except Exception as exc:
        raise TransferError(
            "memfabric-hybrid cannot be imported: pip install 'pd-ascend[memfabric]' "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    return memfabric_hybrid


def import_mooncake() -> Any:
    try:
        from mooncake.engine import TransferEngine
    except Exception as exc:
        raise TransferError(
            "mooncake cannot be imported; build it with -DUSE_ASCEND_DIRECT=ON "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    return TransferEngine


class MemfabricEngine:
    transport = "memfabric"

    def __init__(self, settings: AscendSettings, host: str, device: int, role: str) -> None:
        mf = import_memfabric()
        self.protocol = settings.ascend_mf_transfer_protocol
        ops = mf.TransferEngine.TransDataOpType
        op = ops.DEVICE_RDMA if self.protocol == "device_rdma" else ops.SDMA
        url = settings.ascend_mf_store_url
        if url is None:
            raise TransferError("ASCEND_MF_STORE_URL is not set (e.g. tcp://HOST:PORT)")
        self._mf = mf
        self._engine = mf.TransferEngine()
        # 1.0.x hands out its RPC port before initialize (SGLang names the session with it);
        # 1.3.0 answers 0 until then and picks a port itself for a session id without one.
        early = int(self._engine.get_rpc_port())
        unique = f"{host}:{early}" if early > 0 else host
        ret = self._engine.initialize(url, unique, role, device, op)
        if ret != 0:
            detail = mf.get_last_err_msg() or "memfabric's log above says why"
            raise TransferError(
                f"memfabric-hybrid failed to start (initialize returned {ret}; store {url}, "
                f"role {role}, NPU {device}, {self.protocol}): {detail}"
            )
        port = early if early > 0 else int(self._engine.get_rpc_port())
        self.session = f"{host}:{port}"

    def register(self, addr: int, length: int) -> None:
        ret = self._engine.register_memory(addr, length)
        if ret != 0:
            raise TransferError(f"memfabric could not register {addr:#x}+{length}: returned {ret}")

    def write(self, session: str, local: list[int], remote: list[int], sizes: list[int]) -> int:
        return int(self._engine.batch_transfer_sync_write(session, local, remote, sizes))

    def unregister(self, addr: int) -> None:
        self._engine.unregister_memory(addr)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._engine.unInitialize()
        with contextlib.suppress(Exception):
            self._engine.destroy()


class MooncakeAscendEngine:
    transport = "mooncake"
    protocol = "ascend"

    def __init__(self, settings: AscendSettings, host: str, device: int) -> None:
        engine_cls = import_mooncake()
        set_npu_device(device)  # Mooncake's Ascend transport: set the device before initialize
        name = mooncake_server_name(host, free_port(host), settings.ascend_npu_phy_id, device)
        self._engine = engine_cls()
        ret = self._engine.initialize(name, "P2PHANDSHAKE", "ascend", "")
        if ret != 0:
            raise TransferError(
                f"Mooncake's Ascend transport failed to start as {name} (initialize returned "
                f"{ret}); is this Mooncake built with USE_ASCEND_DIRECT, and /etc/hccn.conf there?"
            )
        self.session = f"{host}:{self._engine.get_rpc_port()}"

    def register(self, addr: int, length: int) -> None:
        if addr % HCCS_ALIGNMENT:
            logger.warning(
                "NPU region %#x is not 2 MiB aligned; Mooncake's Ascend transport needs that "
                "for HCCS (within a node) and may fail writes from it",
                addr,
            )
        ret = self._engine.register_memory(addr, length)
        if ret != 0:
            raise TransferError(f"Mooncake could not register {addr:#x}+{length}: returned {ret}")

    def write(self, session: str, local: list[int], remote: list[int], sizes: list[int]) -> int:
        return int(self._engine.batch_transfer_sync_write(session, local, remote, sizes))

    def unregister(self, addr: int) -> None:
        self._engine.unregister_memory(addr)

    def close(self) -> None:
        self._engine = None


def start_engine(settings: AscendSettings, host: str, device: int, role: str) -> Engine:
    if settings.enable_ascend_transfer_with_mooncake:
        return MooncakeAscendEngine(settings, host, device)
    return MemfabricEngine(settings, host, device, role)
