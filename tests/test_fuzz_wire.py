"""Property-based fuzzing of the PD wire messages (hypothesis, fixed budget and seed).

Malformed msgpack, wrong types and lengths, out-of-range rooms and page ids, unknown message
kinds: fed over real zmq sockets to a real prefill's control socket, to a real decode (from a
stand-in prefill it registered with), and into the decode's notification inbox. Every case
must be a refused message: no exception escapes to the I/O thread's catch-all, the thread
stays up, and afterwards a real room still moves end to end.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdcore.disagg.bootstrap import BootstrapServer
from pdcore.disagg.kv_poll import KVPoll
from pdcore.disagg.messages import PROTOCOL_VERSION, pack, unpack
from tests.conftest import free_port

pytestmark = pytest.mark.timeout(120)

FUZZ = settings(
    max_examples=60,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# --- strategies -----------------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.sampled_from([0, 1, -1, 2**31, 2**63 - 1, 2**64 - 1, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.binary(max_size=40),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=12,
)
page_lists = st.one_of(
    st.lists(st.integers(min_value=-5, max_value=40), max_size=20),
    st.lists(st.sampled_from([0, -1, 2**64 - 1, 2**63, 10**6]), min_size=1, max_size=3),
    values,
)
layouts = st.one_of(
    values,
    st.fixed_dictionaries(
        {
            "k_addr": st.one_of(st.integers(-1, 2**64 - 1), values),
            "v_addr": st.integers(-1, 2**64 - 1),
            "num_layers": st.one_of(st.integers(-1, 70000), values),
            "num_pages": st.integers(-1, 2**41),
            "page_bytes": st.integers(-1, 2**49),
        },
        optional={"device": values, "extra": values},
    ),
)
TO_PREFILL_KINDS = ["register", "prealloc", "abort", "ping", "pong", "registered", "nope", ""]
TO_DECODE_KINDS = ["registered", "pong", "abort", "register", "prealloc", "what", ""]


def messages(kinds: list[str]) -> st.SearchStrategy[bytes]:
    fields = st.fixed_dictionaries(
        {"type": st.one_of(st.sampled_from(kinds), values)},
        optional={
            "room": st.one_of(st.integers(-(2**63), 2**64 - 1), values),
            "pages": page_lists,
            "reason": values,
            "ok": values,
            "instance": values,
            "protocol": st.one_of(st.just(PROTOCOL_VERSION), values),
            "decode_id": values,
            "blob": st.one_of(st.binary(max_size=64), st.integers(0, 2**40), values),
            "layout": layouts,
            "spec": values,
        },
    )
    packed = fields.map(lambda m: msgpack.packb(m, use_bin_type=True))
    return st.one_of(
        packed,
        packed.flatmap(lambda b: st.integers(0, max(0, len(b) - 1)).map(lambda n: b[:n])),
        st.binary(max_size=64),
        values.map(lambda v: msgpack.packb(v, use_bin_type=True)),
    )


# --- real managers ----------------------------------------------------------------------------


def _settings(port: int) -> Any:
    from pdcore.disagg.settings import DisaggSettings

    return DisaggSettings(
        disaggregation_transfer_backend="fake",
        disaggregation_bootstrap_port=port,
        disaggregation_heartbeat_interval=30,
    )


def _pool() -> Any:
    import torch

    from pdcore.model.kv_pool import KVPool

    return KVPool(2, 32, 16, 2, 8, torch.bfloat16, torch.device("cpu"))


class _IOErrors(logging.Handler):
    """Counts what reaches the I/O thread's catch-all (an exception a handler let escape)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Any, Any, _IOErrors]]:
    from pdcore.disagg.kv_receiver import DecodeKVManager
    from pdcore.disagg.kv_sender import PrefillKVManager

    errors = _IOErrors()
    log = logging.getLogger("pdcore.disagg.io_loop")
    log.addHandler(errors)
    prefill = PrefillKVManager(_settings(free_port()), _pool(), "127.0.0.1")
    decode = DecodeKVManager(_settings(prefill.bootstrap_port), _pool(), "127.0.0.1")
    try:
        yield prefill, decode, errors
    finally:
        decode.close()
        prefill.close()
        log.removeHandler(errors)


def _ping(sock: zmq.Socket) -> None:
    """A ping answered means every frame sent before it was handled."""
    sock.send(pack("ping"))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if sock.poll(100) and unpack(sock.recv())["type"] == "pong":
            return
    raise AssertionError("prefill's I/O thread stopped answering")


def _room_moves(prefill: Any, decode: Any, room: int) -> None:
    sender = prefill.create_sender(room)
    receiver = decode.create_receiver(room, "127.0.0.1", prefill.bootstrap_port)
    deadline = time.monotonic() + 10

    def until(handles: list[Any], state: KVPoll) -> None:
        while {h.poll() for h in handles} != {state} and time.monotonic() < deadline:
            prefill.tick()
            decode.tick()
            time.sleep(0.005)
        assert [h.poll() for h in handles] == [state] * len(handles), [
            (h.poll(), h.failure_reason) for h in handles
        ]

    until([receiver], KVPoll.WaitingForInput)
    receiver.prealloc([3, 4])
    until([sender], KVPoll.WaitingForInput)
    sender.send([5, 6], 9, None)
    until([sender, receiver], KVPoll.Success)
    assert receiver.first_token == 9


def test_prefill_refuses_every_malformed_message(pair: Any) -> None:
    prefill, decode, errors = pair
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(prefill.endpoint)
    # Half the cases come from a registered decode, so prealloc/abort reach their handlers.
    registered = zmq.Context.instance().socket(zmq.DEALER)
    registered.setsockopt(zmq.LINGER, 0)
    registered.connect(prefill.endpoint)
    registered.send(
        pack(
            "register",
            protocol=PROTOCOL_VERSION,
            decode_id=decode.backend.local_id,
            blob=decode._blob,
            layout=decode.layout.__dict__,
            spec=decode.spec.to_wire(),
        )
    )
    assert unpack(registered.recv())["ok"] is True

    @FUZZ
    @given(frame=messages(TO_PREFILL_KINDS), known=st.booleans())
    def run(frame: bytes, known: bool) -> None:
        target = registered if known else sock
        target.send(frame)
        _ping(target)
        while target.poll(0):  # replies to the fuzz (refusals, aborts): read and dropped
            target.recv()
        assert not errors.records, errors.records[0].getMessage()

    try:
        run()
    finally:
        sock.close()
        registered.close()
    with prefill.lock:
        prefill._pending.clear()  # page lists the fuzz left for rooms that will never come
        prefill._tombstones.clear()
    _room_moves(prefill, decode, 424242)


class _StandInPrefill:
    """A bootstrap server and a ROUTER a real decode registers with; the test then speaks
    for the prefill."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.ctx = zmq.Context.instance()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        port = self.router.bind_to_random_port("tcp://127.0.0.1")
        route = {
            "protocol": PROTOCOL_VERSION,
            "endpoint": f"tcp://127.0.0.1:{port}",
            "instance": "stand-in",
            "backend_id": "stand-in-prefill",
            "spec": spec,
        }
        self.http = BootstrapServer("127.0.0.1", 0, lambda dp_rank: route)

    def close(self) -> None:
        self.http.close()
        self.router.close()


def test_decode_refuses_every_malformed_message_and_notification(pair: Any) -> None:
    prefill, decode, errors = pair
    fake = _StandInPrefill(prefill.spec.to_wire())
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(msgpack.unpackb(decode._blob)["notify"])
    try:
        receiver = decode.create_receiver(7, "127.0.0.1", fake.http.port)
        assert fake.router.poll(10_000), "decode never registered"
        identity, first = fake.router.recv_multipart()
        assert unpack(first)["type"] == "register"
        fake.router.send_multipart([identity, pack("registered", ok=True)])
        deadline = time.monotonic() + 5
        while receiver.poll() != KVPoll.WaitingForInput and time.monotonic() < deadline:
            time.sleep(0.01)
        receiver.prealloc([3])

        @FUZZ
        @given(
            frame=messages(TO_DECODE_KINDS),
            note=st.one_of(
                st.binary(max_size=64), values.map(lambda v: msgpack.packb(v, use_bin_type=True))
            ),
        )
        def run(frame: bytes, note: bytes) -> None:
            try:
                kind = unpack(frame)["type"]
            except Exception:
                kind = None
            if kind not in ("registered", "pong"):  # those (rightly) unbind the stand-in
                fake.router.send_multipart([identity, frame])
            push.send_multipart([b"stand-in-prefill", note])
            decode.tick()
            time.sleep(0.002)
            assert not errors.records, errors.records[0].getMessage()

        run()
        time.sleep(0.2)
        decode.tick()
        assert not errors.records, errors.records[0].getMessage()
    finally:
        push.close()
        fake.close()
    _room_moves(prefill, decode, 434343)  # the real pair still works
