"""Sans-IO framing between the coordinator and the runtime inside an execution environment.

Wire format: each frame is a 4-byte big-endian body length followed by a UTF-8 JSON object
whose ``"k"`` member names the message. JSON keeps the runtime free of third-party codecs;
the length prefix lets a reader take whole frames off a pipe without scanning.

This module must stay standard-library only: the runtime inside the sandbox loads this very
file by path (the edgevisor package is not installed there), so it may not import edgevisor.

Theory of operation
-------------------
Both ends run the same :class:`RuntimeConnection`, told which role it plays. It tracks one
state for the link, advanced by frames in either direction::

    AWAIT_READY --Ready(runtime)--> IDLE      (Ready with an error: --> CLOSED)
    IDLE        --Load(coord)-----> LOADING   (a prewarmed "stem" runtime gets its handler)
    LOADING     --Ready(runtime)--> IDLE      (Ready with an error: --> CLOSED)
    IDLE        --Invoke(coord)---> BUSY(id)
    BUSY(id)    --Log(runtime)----> BUSY(id)
    BUSY(id)    --Subcall(runtime)--> SUBCALL(id, sub_id)
    SUBCALL     --SubcallResult(coord)--> BUSY(id)
    BUSY(id)    --Result(runtime)-> IDLE
    any         --EOF-------------> CLOSED

A frame that does not fit the state, names the wrong call id, or comes from the wrong role
is a protocol error: :class:`LocalProtocolError` when we try to send it (our bug),
:class:`RemoteProtocolError` when the peer sent it (the peer is broken or hostile; the
coordinator then kills the environment).
"""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "NEED_DATA",
    "Closed",
    "Event",
    "Invoke",
    "Load",
    "LocalProtocolError",
    "Log",
    "ProtocolError",
    "Ready",
    "RemoteProtocolError",
    "Result",
    "Role",
    "RuntimeConnection",
    "State",
    "Subcall",
    "SubcallResult",
]

DEFAULT_MAX_FRAME_BYTES = 8 * 1024 * 1024
_HEADER = struct.Struct(">I")

Role = Literal["coordinator", "runtime"]


class ProtocolError(Exception):
    """A frame that breaks the runtime protocol."""


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol forbids (a bug on this side)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something malformed or out of order."""


@dataclass(frozen=True)
class Ready:
    """Runtime -> coordinator: the handler is loaded (``init_s`` is the load time), or it
    failed to load and ``error`` says why (type, message, traceback); then the link closes."""

    init_s: float
    error: dict[str, Any] | None = None


@dataclass(frozen=True)
class Load:
    """Coordinator -> runtime: a prewarmed runtime (started without a handler) loads one.

    ``bundle`` is the bundle directory as the runtime sees it; ``env`` is added to its
    environment. The runtime answers with :class:`Ready`.
    """

    runtime: str
    handler: str
    bundle: str
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Invoke:
    """Coordinator -> runtime: run one call."""

    id: str
    event: Any
    context: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Result:
    """Runtime -> coordinator: the call ended; ``error`` has type/message/traceback."""

    id: str
    ok: bool
    value: Any = None
    error: dict[str, Any] | None = None


@dataclass(frozen=True)
class Log:
    """Runtime -> coordinator: captured output of the call (already size-capped)."""

    id: str
    stream: str
    data: bytes


@dataclass(frozen=True)
class Subcall:
    """Runtime -> coordinator: the handler calls another task; it waits for the answer."""

    id: str
    sub_id: int
    task: str
    event: Any
    async_: bool = False


@dataclass(frozen=True)
class SubcallResult:
    """Coordinator -> runtime: the answer to :class:`Subcall` ``sub_id``."""

    id: str
    sub_id: int
    ok: bool
    value: Any = None
    error: dict[str, Any] | None = None


@dataclass(frozen=True)
class Closed:
    """The peer closed the link (EOF) at a frame boundary."""


Event = Ready | Load | Invoke | Result | Log | Subcall | SubcallResult | Closed


class _NeedData(Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA = _NeedData.NEED_DATA


class State(Enum):
    AWAIT_READY = "await_ready"
    LOADING = "loading"
    IDLE = "idle"
    BUSY = "busy"
    SUBCALL = "subcall"
    CLOSED = "closed"


_SENDER: dict[type, Role] = {
    Ready: "runtime",
    Result: "runtime",
    Log: "runtime",
    Subcall: "runtime",
    Load: "coordinator",
    Invoke: "coordinator",
    SubcallResult: "coordinator",
}


def _encode(ev: Event) -> dict[str, Any]:
    if isinstance(ev, Ready):
        return {"k": "ready", "init_s": ev.init_s, "error": ev.error}
    if isinstance(ev, Load):
        return {
            "k": "load",
            "runtime": ev.runtime,
            "handler": ev.handler,
            "bundle": ev.bundle,
            "env": ev.env,
        }
    if isinstance(ev, Invoke):
        return {"k": "invoke", "id": ev.id, "event": ev.event, "context": ev.context}
    if isinstance(ev, Result):
        return {"k": "result", "id": ev.id, "ok": ev.ok, "value": ev.value, "error": ev.error}
    if isinstance(ev, Log):
        data = base64.b64encode(ev.data).decode("ascii")
        return {"k": "log", "id": ev.id, "stream": ev.stream, "data": data}
    if isinstance(ev, Subcall):
        return {
            "k": "subcall",
            "id": ev.id,
            "sub_id": ev.sub_id,
            "task": ev.task,
            "event": ev.event,
            "async": ev.async_,
        }
    if isinstance(ev, SubcallResult):
        return {
            "k": "subcall_result",
            "id": ev.id,
            "sub_id": ev.sub_id,
            "ok": ev.ok,
            "value": ev.value,
            "error": ev.error,
        }
    raise LocalProtocolError(f"cannot send {type(ev).__name__}")


def _field(body: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = body.get(name)
    # bool is an int subclass: keep "ok": 1 and "sub_id": true from passing as each other.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        raise RemoteProtocolError(f"frame {body.get('k')!r}: field {name!r} is not {kind}")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _opt_dict(body: dict[str, Any], name: str) -> dict[str, Any] | None:
    value = body.get(name)
    if value is not None and not isinstance(value, dict):
        raise RemoteProtocolError(f"frame {body.get('k')!r}: field {name!r} is not an object")
    return value


def _decode(body: dict[str, Any]) -> Event:
    kind = body.get("k")
    if kind == "ready":
        init_s = _field(body, "init_s", (int, float))
        return Ready(float(init_s), _opt_dict(body, "error"))
    if kind == "load":
        env = _field(body, "env", dict)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise RemoteProtocolError("load frame: env must map strings to strings")
        return Load(
            _field(body, "runtime", str),
            _field(body, "handler", str),
            _field(body, "bundle", str),
            env,
        )
    if kind == "invoke":
        return Invoke(_field(body, "id", str), body.get("event"), _field(body, "context", dict))
    if kind == "result":
        return Result(
            _field(body, "id", str),
            _field(body, "ok", bool),
            body.get("value"),
            _opt_dict(body, "error"),
        )
    if kind == "log":
        try:
            data = base64.b64decode(_field(body, "data", str), validate=True)
        except ValueError as exc:
            raise RemoteProtocolError(f"log frame: bad base64: {exc}") from None
        return Log(_field(body, "id", str), _field(body, "stream", str), data)
    if kind == "subcall":
        return Subcall(
            _field(body, "id", str),
            _field(body, "sub_id", int),
            _field(body, "task", str),
            body.get("event"),
            _field(body, "async", bool),
        )
    if kind == "subcall_result":
        return SubcallResult(
            _field(body, "id", str),
            _field(body, "sub_id", int),
            _field(body, "ok", bool),
            body.get("value"),
            _opt_dict(body, "error"),
        )
    raise RemoteProtocolError(f"unknown frame kind {kind!r}")


class RuntimeConnection:
    """One end of the coordinator <-> runtime link. Bytes in, events out; no I/O."""

    def __init__(self, role: Role, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if role not in ("coordinator", "runtime"):
            raise ValueError(f"unknown role {role!r}")
        self.role: Role = role
        self.max_frame_bytes = max_frame_bytes
        self.state = State.AWAIT_READY
        self.call_id: str | None = None
        self.sub_id: int | None = None
        self._buf = bytearray()
        self._eof = False

    # -- sending ---------------------------------------------------------------------------

    def send(self, event: Event) -> bytes:
        """Validate ``event`` against the state and return the bytes to write."""
        if _SENDER.get(type(event)) != self.role:
            raise LocalProtocolError(f"{self.role} may not send {type(event).__name__}")
        # Encode before advancing: a value that is not JSON leaves the state untouched, so
        # the runtime can still answer the call with an error Result.
        try:
            body = json.dumps(_encode(event), separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            raise LocalProtocolError(f"{type(event).__name__} is not JSON: {exc}") from None
        raw = body.encode("ascii")  # json.dumps escapes non-ASCII
        if len(raw) > self.max_frame_bytes:
            raise LocalProtocolError(
                f"{type(event).__name__} frame of {len(raw)} bytes exceeds the limit of "
                f"{self.max_frame_bytes}"
            )
        try:
            self._advance(event)
        except RemoteProtocolError as exc:
            raise LocalProtocolError(str(exc)) from None
        return _HEADER.pack(len(raw)) + raw

    # -- receiving -------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the peer; ``b""`` means end of file."""
        if self._eof:
            if data:
                raise RemoteProtocolError("data after end of file")
            return
        if data:
            self._buf += data
        else:
            self._eof = True

    def next_event(self) -> Event | _NeedData:
        """Return the next complete event, :data:`NEED_DATA`, or :class:`Closed` at EOF."""
        if self.state is State.CLOSED:
            return Closed()
        buf = self._buf
        if len(buf) >= 4:
            (size,) = _HEADER.unpack_from(buf, 0)
            if size > self.max_frame_bytes:
                raise RemoteProtocolError(
                    f"frame of {size} bytes exceeds the limit of {self.max_frame_bytes}"
                )
            if len(buf) >= 4 + size:
                raw = bytes(buf[4 : 4 + size])
                del buf[: 4 + size]
                try:
                    body = json.loads(raw)
                except (UnicodeDecodeError, ValueError) as exc:
                    raise RemoteProtocolError(f"frame is not JSON: {exc}") from None
                if not isinstance(body, dict):
                    raise RemoteProtocolError("frame is not a JSON object")
                event = _decode(body)
                if _SENDER[type(event)] == self.role:
                    raise RemoteProtocolError(f"peer sent {type(event).__name__}, ours to send")
                self._advance(event)
                return event
        if self._eof:
            if buf:
                raise RemoteProtocolError(f"end of file inside a frame ({len(buf)} bytes)")
            self.state = State.CLOSED
            return Closed()
        return NEED_DATA

    # -- the state machine -------------------------------------------------------------------

    def _advance(self, ev: Event) -> None:
        st = self.state
        if isinstance(ev, Ready) and st in (State.AWAIT_READY, State.LOADING):
            self.state = State.IDLE if ev.error is None else State.CLOSED
        elif isinstance(ev, Load) and st is State.IDLE:
            self.state = State.LOADING
        elif isinstance(ev, Invoke) and st is State.IDLE:
            self.state, self.call_id = State.BUSY, ev.id
        elif isinstance(ev, Log) and st is State.BUSY and ev.id == self.call_id:
            pass
        elif isinstance(ev, Subcall) and st is State.BUSY and ev.id == self.call_id:
            self.state, self.sub_id = State.SUBCALL, ev.sub_id
        elif (
            isinstance(ev, SubcallResult)
            and st is State.SUBCALL
            and ev.id == self.call_id
            and ev.sub_id == self.sub_id
        ):
            self.state, self.sub_id = State.BUSY, None
        elif isinstance(ev, Result) and st is State.BUSY and ev.id == self.call_id:
            self.state, self.call_id = State.IDLE, None
        else:
            raise RemoteProtocolError(
                f"{type(ev).__name__} not allowed in state {st.value} (call {self.call_id!r})"
            )
