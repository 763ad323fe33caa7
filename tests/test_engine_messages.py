"""The typed engine <-> frontend messages: each survives msgpack unchanged, and a malformed
message is a MessageError that says what is wrong (the engine must never crash on one)."""

from __future__ import annotations

import msgpack
import pytest

from pdcore.engine.request import RequestOutput
from pdcore.server.engine_messages import (
    Abort,
    Control,
    ControlReply,
    Error,
    Fatal,
    Generate,
    MessageError,
    Output,
    Ready,
    StartupError,
    decode,
    decode_reply,
    decode_request,
    pack,
    unpack,
)

OUTPUT = RequestOutput(
    rid="r1",
    new_token_ids=[5, 6],
    new_text="hi",
    finished=True,
    finish_reason={"type": "stop", "matched": 2},
    prompt_tokens=3,
    completion_tokens=2,
    cached_tokens=0,
    new_logprobs=[-0.5, 0.0],
)

MESSAGES = [
    Generate("r1", [1, 2, 3], {"max_new_tokens": 4, "temperature": 0.0}),
    Generate(
        "r2",
        [7],
        {"stop": ["\n"]},
        return_logprob=True,
        bootstrap={"host": "10.0.0.1", "port": 8998, "room": 42},
    ),
    Abort("r1"),
    Control(3, "get_load"),
    Ready("tiny-llama", 2048, {"model_path": "/m", "page_size": 16}),
    StartupError("OSError: no such model"),
    Output(OUTPUT),
    Output(RequestOutput("r2", [], "", False, None, 1, 0, 0)),
    Error("r1", "Duplicate request id 'r1'", 400),
    ControlReply(3, {"num_running_reqs": 0, "ratio": 0.25}),
    ControlReply(4, "pong"),
    ControlReply(5, None),
    Fatal("RuntimeError: boom"),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip_through_msgpack(msg):
    wire = msgpack.unpackb(msgpack.packb(msg.to_wire(), use_bin_type=True), raw=False)
    assert decode(wire) == msg
    assert type(msg).from_wire(wire) == msg


def test_frame_round_trip_and_direction():
    frame = pack(MESSAGES)
    assert [decode(raw) for raw in unpack(frame)] == MESSAGES
    requests = [m for m in MESSAGES if isinstance(m, Generate | Abort | Control)]
    assert [decode_request(raw) for raw in unpack(pack(requests))] == requests
    replies = [m for m in MESSAGES if m not in requests]
    assert [decode_reply(raw) for raw in unpack(pack(replies))] == replies
    with pytest.raises(MessageError, match="not expected in this direction"):
        decode_request(Ready("m", 1).to_wire())
    with pytest.raises(MessageError, match="not expected in this direction"):
        decode_reply(Abort("r").to_wire())


def test_wire_keeps_todays_keys():
    """The maps are what the two processes exchanged as bare dicts before the classes."""
    assert Generate("r", [1], {}, True, None).to_wire() == {
        "type": "generate",
        "rid": "r",
        "input_ids": [1],
        "sampling_params": {},
        "return_logprob": True,
        "bootstrap": None,
    }
    assert Output(OUTPUT).to_wire() == {"type": "output", **OUTPUT.to_dict()}
    assert Control(1, "ping").to_wire() == {"type": "control", "id": 1, "op": "ping"}
    assert Error("r", "bad", 500).to_wire() == {
        "type": "error",
        "rid": "r",
        "message": "bad",
        "status": 500,
    }


def test_optional_fields_default_and_unknown_keys_are_ignored():
    assert decode({"type": "generate", "rid": "r", "input_ids": [1], "extra": 1}) == Generate(
        "r", [1]
    )
    assert decode({"type": "error", "rid": "r", "message": "m"}) == Error("r", "m", 400)


def test_unknown_type_is_a_clear_error():
    with pytest.raises(MessageError, match="unknown message type 'launch_missiles'"):
        decode({"type": "launch_missiles", "rid": "r"})
    with pytest.raises(MessageError, match="unknown message type None"):
        decode({"rid": "r"})


@pytest.mark.parametrize(
    ("wire", "pattern"),
    [
        ({"type": "generate", "input_ids": [1]}, "'generate' message lacks the field 'rid'"),
        ({"type": "abort"}, "'abort' message lacks the field 'rid'"),
        ({"type": "control", "op": "ping"}, "'control' message lacks the field 'id'"),
        ({"type": "ready", "model_name": "m"}, "lacks the field 'max_context_len'"),
        ({k: v for k, v in Output(OUTPUT).to_wire().items() if k != "finished"}, "'finished'"),
        ({"type": "control_reply", "id": 1}, "'control_reply' message lacks the field 'result'"),
        ({"type": "fatal"}, "'fatal' message lacks the field 'message'"),
    ],
)
def test_missing_field_is_a_clear_error(wire, pattern):
    with pytest.raises(MessageError, match=pattern):
        decode(wire)


@pytest.mark.parametrize(
    ("wire", "pattern"),
    [
        ({"type": "generate", "rid": "r", "input_ids": "abc"}, "'input_ids' must be list"),
        ({"type": "generate", "rid": "r", "input_ids": [1, "x"]}, "'input_ids'"),
        ({"type": "generate", "rid": "r", "input_ids": [1], "sampling_params": []}, "sampling"),
        ({"type": "abort", "rid": 7}, "field 'rid' must be str, not int"),
        ({"type": "control", "id": True, "op": "ping"}, "field 'id' must be int, not bool"),
        ({**Output(OUTPUT).to_wire(), "new_logprobs": ["x"]}, "'new_logprobs'"),
    ],
)
def test_wrong_field_type_is_a_clear_error(wire, pattern):
    with pytest.raises(MessageError, match=pattern):
        decode(wire)


def test_malformed_generate_names_its_rid_so_the_engine_can_answer():
    with pytest.raises(MessageError) as info:
        decode_request({"type": "generate", "rid": "r9", "input_ids": None})
    assert info.value.rid == "r9"
    with pytest.raises(MessageError) as info:
        decode_request({"type": "abort", "rid": 5})
    assert info.value.rid is None


def test_garbage_frames_and_non_maps():
    with pytest.raises(MessageError, match="undecodable frame"):
        unpack(b"\xc1")  # a byte msgpack never uses
    with pytest.raises(MessageError, match="must be a map, not list"):
        decode([1, 2])
    assert unpack(msgpack.packb({"type": "abort", "rid": "r"})) == [{"type": "abort", "rid": "r"}]


def test_engine_loop_survives_malformed_messages():
    """The engine answers a broken Generate with a 400 Error and drops what it cannot
    attribute, then keeps serving the well-formed messages of the same frame."""
    from pdcore.server.engine_process import EngineLoop

    class FakeCore:
        def __init__(self):
            self.aborted = []

        def abort_request(self, rid):
            self.aborted.append(rid)

    class OneFrame:
        def __init__(self, frames):
            self.frames = list(frames)

        def recv(self, flags=0):
            import zmq

            if not self.frames:
                raise zmq.Again()
            return self.frames.pop(0)

    frame = msgpack.packb(
        [
            {"type": "generate", "rid": "bad", "input_ids": "oops"},
            {"type": "nonsense"},
            "not a map",
            Abort("r1").to_wire(),
        ]
    )
    core = FakeCore()
    loop = EngineLoop(core, OneFrame([b"\xc1", frame]), None, None)
    loop._drain()
    assert core.aborted == ["r1"]
    assert len(loop.outbox) == 1
    (reply,) = loop.outbox
    assert isinstance(reply, Error) and reply.rid == "bad" and reply.status == 400
    assert "input_ids" in reply.message
