"""The messages between the HTTP frontend and the engine process, one frozen dataclass each.

On the wire every message is a msgpack map with a "type" key and the fields below, and a
frame is a list of such maps (several outputs of one step travel together). Never pickle:
the engine must not run code a peer sent, and a map is readable from any language.

frontend -> engine: Generate ("generate"), Abort ("abort"), Control ("control")
engine -> frontend: Ready ("ready", once), StartupError ("startup_error", then exit),
                    Output ("output"), Error ("error"), ControlReply ("control_reply"),
                    Fatal ("fatal", then exit)

Decoding checks that the type is known, every required field is there and each field has
its declared type, and raises `MessageError` naming what is wrong; the engine logs it and
answers the request (when the message names one) instead of crashing its loop. Keys a
message does not declare are ignored, so a newer frontend may add fields. Only this module
knows the "type" strings; both processes work with the classes.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar, Union

import msgpack

from pdcore.engine.request import RequestOutput


class MessageError(ValueError):
    """A frame or message that does not decode; `rid` names the request it was about, if any,
    so the engine can still answer that request's waiter."""

    def __init__(self, message: str, rid: str | None = None) -> None:
        super().__init__(message)
        self.rid = rid


_M = TypeVar("_M", bound="WireMessage")


class WireMessage:
    """Base of every message: its wire "type", and the map <-> object conversions."""

    TYPE: ClassVar[str]

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map: "type" and the fields (shallow: they are plain values already)."""
        fields = dataclasses.fields(typing.cast(Any, self))
        return {"type": self.TYPE, **{f.name: getattr(self, f.name) for f in fields}}

    @classmethod
    def from_wire(cls: type[_M], data: dict[str, Any]) -> _M:
        """The message a map of this type holds; MessageError if a field is missing or of the
        wrong type."""
        return cls(**_checked_fields(cls, data, cls.TYPE))


# ---- frontend -> engine ----------------------------------------------------------------


@dataclass(frozen=True)
class Generate(WireMessage):
    """Start generating for one prompt (already tokenized and checked by the frontend)."""

    TYPE: ClassVar[str] = "generate"
    rid: str
    input_ids: list[int]
    sampling_params: dict[str, Any] | None = None  # SGLang's sampling_params object
    return_logprob: bool = False
    bootstrap: dict[str, Any] | None = None  # PD: {"host", "port", "room"} from the router


@dataclass(frozen=True)
class Abort(WireMessage):
    """Abort a request; its waiter then sees finish_reason "abort"."""

    TYPE: ClassVar[str] = "abort"
    rid: str


@dataclass(frozen=True)
class Control(WireMessage):
    """Run an admin op in the engine; answered by a ControlReply with the same id."""

    TYPE: ClassVar[str] = "control"
    id: int
    op: str  # "ping" | "get_load" | "flush_cache" | "server_info" | "stats" | "metrics"
    # | "kv_cache_blocks"


# ---- engine -> frontend ----------------------------------------------------------------


@dataclass(frozen=True)
class Ready(WireMessage):
    """The model is loaded and the loop runs (sent once, first)."""

    TYPE: ClassVar[str] = "ready"
    model_name: str
    max_context_len: int
    server_info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StartupError(WireMessage):
    """The engine could not start; the process exits after sending this."""

    TYPE: ClassVar[str] = "startup_error"
    message: str


@dataclass(frozen=True)
class Output(WireMessage):
    """What one step produced for one request. On the wire its fields are flat, next to
    "type": the map is `RequestOutput.to_dict()` plus the type."""

    TYPE: ClassVar[str] = "output"
    output: RequestOutput

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, **self.output.to_dict()}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Output:
        return cls(RequestOutput.from_dict(_checked_fields(RequestOutput, data, cls.TYPE)))


@dataclass(frozen=True)
class Error(WireMessage):
    """The engine refused a request (status 400) or failed to add it (500)."""

    TYPE: ClassVar[str] = "error"
    rid: str
    message: str
    status: int = 400


@dataclass(frozen=True)
class ControlReply(WireMessage):
    """The result of the Control message with the same id."""

    TYPE: ClassVar[str] = "control_reply"
    id: int
    result: Any


@dataclass(frozen=True)
class Fatal(WireMessage):
    """The engine loop crashed; the process exits after sending this."""

    TYPE: ClassVar[str] = "fatal"
    message: str


FrontendMessage = Generate | Abort | Control
EngineMessage = Ready | StartupError | Output | Error | ControlReply | Fatal
Message = FrontendMessage | EngineMessage

_FRONTEND: tuple[type[FrontendMessage], ...] = (Generate, Abort, Control)
_ENGINE: tuple[type[EngineMessage], ...] = (Ready, StartupError, Output, Error, ControlReply, Fatal)
_BY_TYPE: dict[str, type[Message]] = {cls.TYPE: cls for cls in (*_FRONTEND, *_ENGINE)}


def decode(data: Any) -> Message:
    """The message a wire map holds, of any direction; MessageError if it is malformed."""
    return _decode(data)


def decode_request(data: Any) -> FrontendMessage:
    """A frontend -> engine message; the engine's only way in."""
    msg = _decode(data, allowed=_FRONTEND)
    assert isinstance(msg, Generate | Abort | Control)  # for the type checker: `allowed`
    return msg


def decode_reply(data: Any) -> EngineMessage:
    """An engine -> frontend message; the frontend's only way in."""
    msg = _decode(data, allowed=_ENGINE)
    assert not isinstance(msg, Generate | Abort | Control)
    return msg


def pack(messages: Iterable[Message]) -> bytes:
    """One frame: a msgpack list of message maps."""
    return msgpack.packb([m.to_wire() for m in messages], use_bin_type=True)


def unpack(frame: bytes) -> list[Any]:
    """The raw maps of a frame, to decode one by one (one bad message must not cost the
    others); MessageError if the frame is not msgpack at all."""
    try:
        data = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise MessageError(f"undecodable frame ({type(exc).__name__}: {exc})") from exc
    return data if isinstance(data, list) else [data]


# ---- decoding ----------------------------------------------------------------------------


def _decode(data: Any, allowed: tuple[type[Message], ...] | None = None) -> Message:
    if not isinstance(data, dict):
        raise MessageError(f"a message must be a map, not {type(data).__name__}")
    kind = data.get("type")
    cls = _BY_TYPE.get(kind) if isinstance(kind, str) else None
    # Only a Generate opens a waiter in the frontend: name its rid so the engine can answer.
    rid = data.get("rid") if kind == Generate.TYPE and isinstance(data.get("rid"), str) else None
    if cls is None:
        raise MessageError(f"unknown message type {kind!r}", rid)
    if allowed is not None and cls not in allowed:
        raise MessageError(f"message type {kind!r} is not expected in this direction", rid)
    try:
        return cls.from_wire(data)
    except MessageError as exc:
        raise MessageError(str(exc), rid) from None


def _checked_fields(cls: type[Any], data: dict[str, Any], kind: str) -> dict[str, Any]:
    """The fields of dataclass `cls` found in `data`, each checked against its annotation;
    a missing field without a default is an error, unknown keys are dropped."""
    kwargs: dict[str, Any] = {}
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in data:
            value = data[f.name]
            if not _conforms(value, hints[f.name]):
                raise MessageError(
                    f"{kind!r} message: field {f.name!r} must be {_describe(hints[f.name])}, "
                    f"not {type(value).__name__}"
                )
            kwargs[f.name] = value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise MessageError(f"{kind!r} message lacks the field {f.name!r}")
    return kwargs


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """The resolved field annotations of a class (they are strings under PEP 563), cached."""
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def _conforms(value: Any, hint: Any) -> bool:
    """Whether a decoded msgpack value fits a field annotation (the few shapes used here)."""
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin is types.UnionType or origin is Union:
        return any(_conforms(value, arg) for arg in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_conforms(v, item) for v in value)
    if origin is dict:
        key, val = typing.get_args(hint)
        return isinstance(value, dict) and all(
            _conforms(k, key) and _conforms(v, val) for k, v in value.items()
        )
    if hint is float:  # msgpack keeps 0 an int even where a float is meant
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__name__
    return str(hint).replace("typing.", "")
