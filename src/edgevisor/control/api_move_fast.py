"""``POST /v1/addresses/{ref}/move``, common case, in front of FastAPI (ASGI middleware).

A move is on the critical path of a migration's switch, and measured on this VM FastAPI
costs ~0.5 ms of CPU per request before the endpoint runs (route matching over every
route of the API, dependency solving, body validation) plus its response path.
:class:`MoveFastPath` serves the common case without it: the bearer token already in the
API's token cache, a small body that validates as :class:`~edgevisor.sdk.addresses.AddressMove`,
and a move that :class:`~edgevisor.control.addr_move.FastMover` makes on the event loop
without waiting for a lock. Everything else (unknown or uncached token, invalid body,
PostgreSQL, a busy store, any move out of the common case) goes to the FastAPI route
unchanged, with the body replayed: nothing was changed by then (the hot path rolls back
and returns None, or raises ``Busy`` before writing), so the route answers exactly as
without this middleware, errors included. The answer of a served move is the route's:
the same pushes (old host first) and the same JSON.

Installed by :func:`install` (``create_app``); the route stays the documented one.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgevisor.control.addr_move import Busy
from edgevisor.control.addr_sync import push
from edgevisor.control.api_addresses import fast_move, move_answer
from edgevisor.control.state import ControllerState
from edgevisor.errors import EdgevisorError
from edgevisor.httpserver import bearer_token, replay
from edgevisor.sdk import addresses as w

__all__ = ["MAX_BODY_BYTES", "MoveFastPath", "install"]

log = logging.getLogger(__name__)

#: Larger bodies are the route's (a move's body is ~60 bytes).
MAX_BODY_BYTES = 4096
_PREFIX = "/v1/addresses/"
_SUFFIX = "/move"
_JSON = [(b"content-type", b"application/json")]


def _ref(scope: Scope) -> str | None:
    """The ``{ref}`` of a move's path, or None if this is not a move."""
    if scope["type"] != "http" or scope["method"] != "POST":
        return None
    path: str = scope["path"]
    if not (path.startswith(_PREFIX) and path.endswith(_SUFFIX)):
        return None
    ref = path[len(_PREFIX) : -len(_SUFFIX)]
    return ref if ref and "/" not in ref else None


def _bearer(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            return bearer_token(value.decode("latin-1"))
    return None


class MoveFastPath:
    """ASGI middleware serving the common case of a move (see the module doc)."""

    def __init__(self, app: ASGIApp, st: ControllerState) -> None:
        self.app = app
        self.st = st
        self.served = 0  # moves served here (tests, diagnostics)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ref = _ref(scope)
        if ref is None:
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        body = b""
        while True:
            msg = await receive()
            messages.append(msg)
            if msg["type"] != "http.request":
                break  # a disconnect: the route deals with it
            body += msg.get("body", b"")
            if len(body) > MAX_BODY_BYTES or not msg.get("more_body", False):
                break
        answer = None
        if messages[-1]["type"] == "http.request" and not messages[-1].get("more_body"):
            answer = await self._serve(scope, ref, body)
        if answer is None:
            await self.app(scope, replay(messages, receive), send)
            return
        self.served += 1
        status, data = answer
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [*_JSON, (b"content-length", str(len(data)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": data})

    async def _serve(self, scope: Scope, ref: str, body: bytes) -> tuple[int, bytes] | None:
        """``(status, body)`` of a move made here, or None: the route serves the request."""
        secret = _bearer(scope)
        app = scope.get("app")
        cache = getattr(getattr(app, "state", None), "token_cache", None)
        principal = cache.get(secret) if cache is not None and secret else None
        if principal is None:
            return None
        try:
            req = w.AddressMove.model_validate_json(body)
        except ValidationError:
            return None
        try:
            change = fast_move(self.st, principal, ref, req, wait=False)
        except Busy:
            return None
        if change is None:
            return None
        # Committed: from here on the request is this middleware's, whatever happens.
        try:
            if change.before or change.after:
                await push(self.st, change)
            return 200, move_answer(change)
        except Exception as exc:
            # As the route's unhandled errors (http_errors); the reconciler pushes what
            # a host missed.
            log.exception("move of %s committed, but its pushes or answer failed", ref)
            err = EdgevisorError(f"internal error: {type(exc).__name__}")
            return 500, json.dumps(err.to_payload()).encode()


def install(app: Any, st: ControllerState) -> None:
    """Put :class:`MoveFastPath` in front of ``app``'s routes (a FastAPI app not started
    yet; once: a second call does nothing)."""
    if getattr(app.state, "move_fast_path", False):
        return
    app.add_middleware(MoveFastPath, st=st)
    app.state.move_fast_path = True
