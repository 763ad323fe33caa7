"""Authentication of the PD control plane: a shared secret, an HMAC on every message.

Without it, any process that can reach a prefill's bootstrap port or zmq port could register
as a decode and receive KV data, or announce memory regions for prefill to write into. With
`--disaggregation-auth-token` (PDCORE_DISAGGREGATION_AUTH_TOKEN) set to the same secret on
every prefill and decode instance:

- every zmq control message (register, prealloc, abort, ping; registered, pong) and every
  completion notification travels in an envelope signed with HMAC-SHA256 over a direction
  label, a timestamp, a random nonce and the message; the receiver checks it *before* the
  message is parsed, so nothing is registered, no memory region or page list is accepted,
  and no room is touched for an unauthenticated peer;
- the bootstrap server's `GET /route` needs a signed `X-PDCore-Auth` header and signs its
  answer the same way (so a decode cannot be pointed at an impostor either);
- a message older than `WINDOW_S` (or from more than `WINDOW_S` in the future: clocks must
  agree within it) is refused, and so is a nonce seen within the window (a replay).

A refusal is logged with its reason (never the secret, never the MAC). The envelope is
msgpack like every control message; nothing from the network is ever unpickled.
Without a token every call here is the identity, and the control plane is as open as it
was: `warn_if_open` says so at start-up when the side listens on a non-loopback address.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import struct
import threading
import time

import msgpack

logger = logging.getLogger(__name__)

FLAG = "--disaggregation-auth-token"
ENV = "PDCORE_DISAGGREGATION_AUTH_TOKEN"
WINDOW_S = 30.0
"""How old (or how far in the future) a signed message may be; also how long nonces are
remembered to refuse replays."""
HEADER = "X-PDCore-Auth"
_VERSION = 1
_MAX_NONCES = 1_000_000  # a flood of valid messages must not grow memory without bound

# Direction labels: a message signed for one direction is refused in the other, so a frame
# captured from prefill cannot be reflected back to it.
TO_PREFILL = b"pdcore/pd-control/v1/decode->prefill"
TO_DECODE = b"pdcore/pd-control/v1/prefill->decode"
NOTIFY = b"pdcore/pd-notify/v1/prefill->decode"
ROUTE_QUERY = b"pdcore/pd-bootstrap/v1/query"
ROUTE_ANSWER = b"pdcore/pd-bootstrap/v1/answer"


class AuthError(ValueError):
    """A message that failed authentication; the text is safe to log and to send back."""


def hint() -> str:
    return f"set the same {FLAG} (or {ENV}) on every prefill and decode instance"


class ControlAuth:
    """Seals and opens control-plane messages with one shared token (thread-safe).

    `ControlAuth(None)` is the open control plane: `seal` and `open` return their input.
    """

    def __init__(self, token: str | None) -> None:
        self._key = token.encode() if token else None
        self._seen: dict[bytes, float] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def __repr__(self) -> str:  # never the key
        return f"ControlAuth(enabled={self.enabled})"

    def _mac(self, label: bytes, ts: float, nonce: bytes, payload: bytes) -> bytes:
        assert self._key is not None
        msg = b"\0".join((label, struct.pack("!d", ts), nonce, payload))
        return hmac.new(self._key, msg, hashlib.sha256).digest()

    # --- envelopes (zmq messages, notifications) ------------------------------------------

    def seal(self, label: bytes, payload: bytes) -> bytes:
        """The envelope of `payload` for `label`'s direction; `payload` itself when off."""
        if self._key is None:
            return payload
        ts, nonce = time.time(), os.urandom(16)
        env = {
            "pdauth": _VERSION,
            "ts": ts,
            "nonce": nonce,
            "msg": payload,
            "mac": self._mac(label, ts, nonce, payload),
        }
        out: bytes = msgpack.packb(env, use_bin_type=True)
        return out

    def open(self, label: bytes, frame: bytes) -> bytes:
        """The payload of a sealed `frame`, checked; AuthError saying why it was refused.
        When off, `frame` as it came."""
        if self._key is None:
            return frame
        try:
            env = msgpack.unpackb(frame, raw=False)
        except Exception as exc:  # malformed msgpack of any kind: refused, never raised
            raise AuthError(f"not a signed message ({type(exc).__name__}); {hint()}") from None
        if not isinstance(env, dict) or "pdauth" not in env:
            raise AuthError(f"unsigned message; {hint()}")
        ts, nonce, payload, mac = env.get("ts"), env.get("nonce"), env.get("msg"), env.get("mac")
        if (
            env.get("pdauth") != _VERSION
            or not isinstance(ts, (int, float))
            or isinstance(ts, bool)
            or not isinstance(nonce, bytes)
            or not isinstance(payload, bytes)
            or not isinstance(mac, bytes)
        ):
            raise AuthError("malformed signed message")
        self.check(label, float(ts), nonce, payload, mac)
        return payload

    def check(self, label: bytes, ts: float, nonce: bytes, payload: bytes, mac: bytes) -> None:
        """Raise AuthError unless `mac` signs (label, ts, nonce, payload) with our token, `ts`
        is within the window, and `nonce` was not seen in it."""
        if self._key is None:
            return
        if not hmac.compare_digest(self._mac(label, ts, nonce, payload), mac):
            raise AuthError(f"bad signature (the token differs?); {hint()}")
        now = time.time()
        if not abs(now - ts) <= WINDOW_S:  # also refuses NaN
            raise AuthError(
                f"message timestamp {now - ts:+.1f} s off (window {WINDOW_S:g} s): a replay, "
                "or the clocks of the two machines differ"
            )
        with self._lock:
            if nonce in self._seen:
                raise AuthError("replayed message (nonce already seen)")
            if len(self._seen) >= _MAX_NONCES or len(self._seen) % 1024 == 0:
                self._prune(now)
            if len(self._seen) >= _MAX_NONCES:
                raise AuthError("too many messages within the replay window")
            self._seen[nonce] = ts

    def _prune(self, now: float) -> None:
        self._seen = {n: t for n, t in self._seen.items() if now - t <= WINDOW_S}

    # --- the bootstrap server's HTTP --------------------------------------------------------

    def header(self, label: bytes, payload: bytes) -> dict[str, str]:
        """The `X-PDCore-Auth` header signing `payload` (empty dict when off)."""
        if self._key is None:
            return {}
        ts, nonce = time.time(), os.urandom(16)
        mac = self._mac(label, ts, nonce, payload)
        return {HEADER: f"{_VERSION}:{ts!r}:{nonce.hex()}:{mac.hex()}"}

    def check_header(self, label: bytes, value: str | None, payload: bytes) -> None:
        """Raise AuthError unless `value` (an `X-PDCore-Auth` header) signs `payload`."""
        if self._key is None:
            return
        if not value:
            raise AuthError(f"no {HEADER} header; {hint()}")
        try:
            version, ts, nonce, mac = value.split(":")
            if int(version) != _VERSION:
                raise ValueError(version)
            parsed = (float(ts), bytes.fromhex(nonce), bytes.fromhex(mac))
        except ValueError:
            raise AuthError(f"malformed {HEADER} header") from None
        self.check(label, parsed[0], parsed[1], payload, parsed[2])


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def warn_if_open(auth: ControlAuth, host: str, role: str) -> None:
    """The start-up warning of an unauthenticated control plane reachable from elsewhere."""
    if not auth.enabled and not is_loopback(host):
        logger.warning(
            "PD %s: the control plane (bootstrap server and zmq socket on %s) is OPEN: any "
            "process that can reach it can register as a peer and exchange KV cache. Set %s "
            "(or %s) to the same secret on every instance.",
            role,
            host,
            FLAG,
            ENV,
        )
