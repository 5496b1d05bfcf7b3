"""Frames of the agent push channel: one WebSocket per agent, opened by the controller.

The channel carries the records operations of the remap hot path (``records.apply`` and
friends, :data:`CHANNEL_OPS`) without an HTTP request per call: the connection is
authenticated once, in the upgrade (``authorization: Bearer <agent key>``), then every
call is one text frame each way, multiplexed by ``id``::

    controller -> agent   {"id": 7, "op": "records.apply", "payload": {...}}
    agent -> controller   {"id": 7, "result": ...}
                          {"id": 7, "status": 409, "error": {"code": ..., "message": ...}}

The error object is the HTTP API's (``{"error": {...}}`` body) with the HTTP status it
would have had, so the controller rebuilds the same typed error
(:func:`edgevisor.errors.from_payload`) whichever way the call went.

This module is pure (text in, values out): the agent's endpoint (:mod:`.server`) and the
controller's client (:mod:`edgevisor.control.agent_channel`) do the I/O.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from edgevisor.errors import Conflict, EdgevisorError, from_payload

__all__ = [
    "CHANNEL_OPS",
    "CHANNEL_PATH",
    "MAX_FRAME_CHARS",
    "FrameError",
    "NotPrepared",
    "Reply",
    "Request",
    "decode_reply",
    "decode_request",
    "encode_error",
    "encode_reply",
    "encode_request",
]

#: Where the agent accepts the channel.
CHANNEL_PATH = "/agent/v1/channel"

#: Operations the controller sends over the channel. All are idempotent or harmless to
#: repeat (generations only grow; a commit of a taken prepare is refused), so a call whose
#: channel broke while it was in flight is sent again over HTTP.
CHANNEL_OPS = frozenset({"records.apply", "records.state", "records.prepare", "records.commit"})


#: Larger requests go over HTTP (uvicorn refuses WebSocket messages over 16 MiB by
#: default, and a full set of 100,000 records is about that size).
MAX_FRAME_CHARS = 4 * 1024 * 1024


class NotPrepared(Conflict):
    """A ``records.commit`` found no staged prepare (never made, expired or taken):
    the controller then sends the full ``records.apply``."""

    code = "not_prepared"


class FrameError(ValueError):
    """A frame that is not a channel frame. ``id`` is the call's, when it could be read
    (the agent then answers that call with a request error; without one it closes)."""

    def __init__(self, message: str, id: int | None = None) -> None:
        super().__init__(message)
        self.id = id


@dataclass(frozen=True, slots=True)
class Request:
    id: int
    op: str
    payload: Any


@dataclass(frozen=True, slots=True)
class Reply:
    """An answer: ``error`` None means ``result`` is the op's JSON result."""

    id: int
    result: Any = None
    error: EdgevisorError | None = None


def _id(raw: Any) -> int | None:
    got = raw.get("id") if isinstance(raw, dict) else None
    return got if isinstance(got, int) and not isinstance(got, bool) else None


def encode_request(id: int, op: str, payload: Any) -> str:
    return json.dumps({"id": id, "op": op, "payload": payload})


def _frame(text: str | bytes, kind: str) -> tuple[dict[str, Any], int]:
    """A frame's JSON object and its id (FrameError: not JSON, or no integer id)."""
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise FrameError(f"malformed JSON frame: {exc}") from exc
    rid = _id(raw)
    if rid is None:
        raise FrameError(f"a {kind} frame needs an integer id")
    return raw, rid


def decode_request(text: str | bytes) -> Request:
    raw, rid = _frame(text, "request")
    op = raw.get("op")
    if not isinstance(op, str) or not op:
        raise FrameError("a request frame needs an op (a string)", rid)
    return Request(rid, op, raw.get("payload", {}))


def encode_reply(id: int, result: Any) -> str:
    return json.dumps({"id": id, "result": result})


def encode_error(id: int, exc: EdgevisorError) -> str:
    return json.dumps({"id": id, "status": exc.status, **exc.to_payload()})


def decode_reply(text: str | bytes) -> Reply:
    """A reply frame; an ``error`` member becomes the typed error it names."""
    raw, rid = _frame(text, "reply")
    if "error" in raw:
        status = raw.get("status")
        status = status if isinstance(status, int) and not isinstance(status, bool) else 500
        return Reply(rid, error=from_payload(status, {"error": raw["error"]}))
    if "result" not in raw:
        raise FrameError("a reply frame needs a result or an error", rid)
    return Reply(rid, result=raw["result"])
