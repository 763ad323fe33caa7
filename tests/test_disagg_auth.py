"""The authenticated PD control plane (--disaggregation-auth-token): real managers, real
sockets on 127.0.0.1, the pd_fake backend in one process; no model."""

from __future__ import annotations

import http.client
import logging
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import zmq

from pdcore.disagg import auth as pd_auth
from pdcore.disagg.auth import TO_DECODE, TO_PREFILL, AuthError, ControlAuth
from pdcore.disagg.kv_poll import KVPoll
from pdcore.disagg.messages import PROTOCOL_VERSION, pack, unpack
from tests.conftest import free_port

pytestmark = pytest.mark.timeout(60)

TOKEN = "s3cret-Token-for-tests"


# --- the envelope ---------------------------------------------------------------------------


def test_seal_and_open_round_trip_and_refusals() -> None:
    a, b = ControlAuth(TOKEN), ControlAuth(TOKEN)
    frame = a.seal(TO_PREFILL, b"payload")
    assert TOKEN.encode() not in frame and b"payload" in frame
    assert b.open(TO_PREFILL, frame) == b"payload"
    with pytest.raises(AuthError, match="replayed"):
        b.open(TO_PREFILL, frame)
    with pytest.raises(AuthError, match="bad signature"):  # reflected to the other side
        ControlAuth(TOKEN).open(TO_DECODE, frame)
    with pytest.raises(AuthError, match="bad signature.*--disaggregation-auth-token"):
        ControlAuth("another").open(TO_PREFILL, frame)
    with pytest.raises(AuthError, match="unsigned.*--disaggregation-auth-token"):
        b.open(TO_PREFILL, pack("register"))
    env = msgpack.unpackb(a.seal(TO_PREFILL, b"x"))
    env["msg"] = b"y"  # tampered
    with pytest.raises(AuthError, match="bad signature"):
        b.open(TO_PREFILL, msgpack.packb(env))
    for garbage in (b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"pdauth": "x"})):
        with pytest.raises(AuthError):
            b.open(TO_PREFILL, garbage)
    off = ControlAuth(None)
    assert off.seal(TO_PREFILL, b"p") == b"p" and off.open(TO_PREFILL, b"p") == b"p"
    assert TOKEN not in repr(a)


def test_old_messages_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    a = ControlAuth(TOKEN)
    real = time.time()
    monkeypatch.setattr(pd_auth.time, "time", lambda: real - pd_auth.WINDOW_S - 5)
    frame = a.seal(TO_PREFILL, b"old")
    monkeypatch.setattr(pd_auth.time, "time", lambda: real)
    with pytest.raises(AuthError, match="timestamp"):
        ControlAuth(TOKEN).open(TO_PREFILL, frame)


# --- real managers --------------------------------------------------------------------------


def _settings(token: str | None, port: int) -> Any:
    from pdcore.disagg.settings import DisaggSettings

    return DisaggSettings(
        disaggregation_transfer_backend="fake",
        disaggregation_bootstrap_port=port,
        disaggregation_auth_token=token,
        disaggregation_heartbeat_interval=0.5,
    )


def _pool() -> Any:
    import torch

    from pdcore.model.kv_pool import KVPool

    return KVPool(2, 16, 16, 2, 8, torch.bfloat16, torch.device("cpu"))


@pytest.fixture()
def prefill() -> Iterator[Any]:
    from pdcore.disagg.kv_sender import PrefillKVManager

    manager = PrefillKVManager(_settings(TOKEN, free_port()), _pool(), "127.0.0.1")
    try:
        yield manager
    finally:
        manager.close()


def _decode(token: str | None, port: int) -> Any:
    from pdcore.disagg.kv_receiver import DecodeKVManager

    return DecodeKVManager(_settings(token, port), _pool(), "127.0.0.1")


def _until(
    managers: list[Any], handles: list[Any], states: set[KVPoll], wait_s: float = 10
) -> None:
    deadline = time.monotonic() + wait_s
    while {h.poll() for h in handles} - states and time.monotonic() < deadline:
        for m in managers:
            m.tick()
        time.sleep(0.005)
    assert {h.poll() for h in handles} <= states, [(h.poll(), h.failure_reason) for h in handles]


def test_same_token_moves_a_room(prefill: Any) -> None:
    decode = _decode(TOKEN, prefill.bootstrap_port)
    try:
        sender = prefill.create_sender(11)
        receiver = decode.create_receiver(11, "127.0.0.1", prefill.bootstrap_port)
        _until([prefill, decode], [receiver], {KVPoll.WaitingForInput})
        receiver.prealloc([3, 4])
        _until([prefill, decode], [sender], {KVPoll.WaitingForInput})
        sender.send([5, 6], 42, -0.5)
        _until([prefill, decode], [sender, receiver], {KVPoll.Success})
        assert (receiver.first_token, receiver.first_logprob) == (42, -0.5)
        assert prefill.metrics()["control"]["auth_refusals"] == 0
    finally:
        decode.close()


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_decode_without_the_token_fails_naming_the_flag(
    prefill: Any, token: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    decode = _decode(token, prefill.bootstrap_port)
    try:
        with caplog.at_level(logging.INFO):
            sender = prefill.create_sender(12)
            receiver = decode.create_receiver(12, "127.0.0.1", prefill.bootstrap_port)
            _until([prefill, decode], [receiver], {KVPoll.Failed}, wait_s=5)
        reason = receiver.failure_reason
        assert "refused" in reason and "--disaggregation-auth-token" in reason, reason
        assert sender.poll() == KVPoll.Bootstrapping  # nothing reached the room
        assert not prefill._decodes  # nothing registered
        assert prefill.metrics()["control"]["auth_refusals"] >= 1
        assert "refused bootstrap query from 127.0.0.1" in caplog.text
        assert TOKEN not in caplog.text and TOKEN not in reason
    finally:
        decode.close()


def test_decode_with_a_token_refuses_an_open_prefill() -> None:
    from pdcore.disagg.kv_sender import PrefillKVManager

    open_prefill = PrefillKVManager(_settings(None, free_port()), _pool(), "127.0.0.1")
    decode = _decode(TOKEN, open_prefill.bootstrap_port)
    try:
        receiver = decode.create_receiver(13, "127.0.0.1", open_prefill.bootstrap_port)
        _until([open_prefill, decode], [receiver], {KVPoll.Failed}, wait_s=5)
        assert "did not authenticate itself" in receiver.failure_reason
        assert "--disaggregation-auth-token" in receiver.failure_reason
        assert not open_prefill._decodes
    finally:
        decode.close()
        open_prefill.close()


def _register_frame(prefill: Any, **override: Any) -> bytes:
    msg = {
        "protocol": PROTOCOL_VERSION,
        "decode_id": "intruder",
        "blob": b"x",
        "layout": {
            "k_addr": 4096,
            "v_addr": 8192,
            "num_layers": 2,
            "num_pages": 16,
            "page_bytes": 512,
            "device": "cpu",
        },
        "spec": prefill.spec.to_wire(),
        **override,
    }
    return pack("register", **msg)


def _dealer(prefill: Any) -> zmq.Socket:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 3000)
    sock.connect(prefill.endpoint)
    return sock


def test_unauthenticated_registration_over_zmq_is_refused(
    prefill: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """An intruder that skips the bootstrap server and speaks zmq straight to the prefill's
    control socket: its registration and page list are refused before anything is kept."""
    sock = _dealer(prefill)
    try:
        with caplog.at_level(logging.WARNING):
            sock.send(_register_frame(prefill))
            reply = unpack(sock.recv())
            sock.send(pack("prealloc", room=5, pages=[1, 2]))
            assert unpack(sock.recv())["ok"] is False
        assert reply["type"] == "registered" and reply["ok"] is False
        assert "unauthenticated" in reply["reason"]
        assert "--disaggregation-auth-token" in reply["reason"]
        assert not prefill._decodes and not prefill._pending
        assert "refused a control message from decode" in caplog.text
        assert TOKEN not in caplog.text
        # A signed registration captured on the wire and replayed is refused too.
        real = ControlAuth(TOKEN).seal(TO_PREFILL, _register_frame(prefill, blob=b"\xc0"))
        sock.send(real)
        first = unpack(ControlAuth(TOKEN).open(TO_DECODE, sock.recv()))
        assert first["ok"] is False and "backend" in first["reason"]  # checked, then refused
        sock.send(real)
        replayed = unpack(sock.recv())  # unsigned: the refusal of an unauthenticated message
        assert replayed["ok"] is False and "replayed" in replayed["reason"]
    finally:
        sock.close()


def test_bootstrap_route_needs_a_signed_query(prefill: Any) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", prefill.bootstrap_port, timeout=5)
    try:
        conn.request("GET", "/route")
        resp = conn.getresponse()
        body = resp.read().decode()
        assert resp.status == 401 and "--disaggregation-auth-token" in body
        assert prefill.endpoint not in body and TOKEN not in body
        conn.request("GET", "/health")  # load balancers still see it alive
        assert conn.getresponse().status == 200
    finally:
        conn.close()


def test_sockets_bind_to_the_given_host(prefill: Any) -> None:
    assert prefill.endpoint.startswith("tcp://127.0.0.1:")
    assert prefill._http._server.server_address[0] == "127.0.0.1"


def test_open_control_plane_warns_off_loopback(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        pd_auth.warn_if_open(ControlAuth(None), "127.0.0.1", "prefill")
        pd_auth.warn_if_open(ControlAuth(TOKEN), "10.1.2.3", "prefill")
        assert "OPEN" not in caplog.text
        pd_auth.warn_if_open(ControlAuth(None), "0.0.0.0", "decode")
    assert "control plane" in caplog.text and "OPEN" in caplog.text
    assert "--disaggregation-auth-token" in caplog.text


def test_control_counters_reach_metrics() -> None:
    from pdcore.disagg.metrics import TransferStats, failure_kind
    from pdcore.server.metrics import Metrics

    assert failure_kind("prefill 1.2.3.4:8998 missed 2 heartbeats (5 s apart)") == "heartbeat"
    assert failure_kind("no page list ... (bootstrap timeout)") == "bootstrap_timeout"
    assert failure_kind(None) == "other"
    stats = TransferStats("fake")
    stats.count("heartbeat_failures")
    stats.count("auth_refusals", 2)
    stats.record(1, "decode", False, 0, 0.0, "KV cache did not arrive (waiting timeout)")
    metrics = Metrics("m")
    metrics.set_engine_stats(stats.snapshot())
    text = metrics.render().decode()
    assert "pdcore_pd_heartbeat_failures_total 1.0" in text
    assert "pdcore_pd_auth_refusals_total 2.0" in text
    assert (
        'pdcore_kv_transfer_failures_by_reason_total{backend="fake",reason="waiting_timeout",'
        'role="decode"} 1.0' in text
    )


def test_latency_samples_stay_bounded_without_a_scrape() -> None:
    """Samples wait for /metrics to drain them; a server nobody scrapes must not grow."""
    from pdcore.disagg.metrics import TransferStats

    stats = TransferStats("fake")
    for i in range(25_000):
        stats.record(i, "prefill", True, 10, 0.001, None)
    assert len(stats._samples) <= 10_000
    drained = stats.snapshot(drain_samples=True)["transfer"]["fake"]
    assert drained["transfers_total"] == 25_000 and len(drained["latency_samples_s"]) <= 10_000
