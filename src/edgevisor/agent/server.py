"""The agent's HTTP API: the controller calls agent operations here.

Only the controller holds the per-host agent key, handed over at join; every call must
present it. Errors leave as the same ``{"error": {...}}`` bodies as the controller's.
Plain Starlette rather than FastAPI: two routes need no schema, and the agent stays lean.

Besides ``POST /agent/v1/ops/{name}``, the controller may open the push channel
(:data:`~edgevisor.agent.channel_frames.CHANNEL_PATH`, a WebSocket authenticated with the
same key in the upgrade; frames in :mod:`.channel_frames`): the same
:meth:`OpRouter.dispatch` and the same typed errors, without an HTTP request per call.
Each frame is served in a task of its own (calls are multiplexed by id); the answers go
back in the order they complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from edgevisor import __version__
from edgevisor.agent.channel_frames import (
    CHANNEL_PATH,
    FrameError,
    decode_request,
    encode_error,
    encode_reply,
)
from edgevisor.agent.rpc import OpRouter
from edgevisor.errors import EdgevisorError, RequestError, Unauthorized
from edgevisor.httpserver import BodyLimit, bearer_token

log = logging.getLogger(__name__)
KeyFn = Callable[[], str | None]

#: WebSocket close code for a refused or broken channel (policy violation).
CLOSE_POLICY = 1008


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def _authorized(header: str, expected: str | None) -> bool:
    secret = bearer_token(header)
    return (
        bool(expected)
        and secret is not None
        and hmac.compare_digest(secret.encode(), str(expected).encode())
    )


async def _answer(router: OpRouter, rid: int, op: str, payload: Any) -> str:
    """One channel call, as ``call_op`` serves it over HTTP: the result or the error."""
    try:
        return encode_reply(rid, await router.dispatch(op, payload))
    except EdgevisorError as exc:
        return encode_error(rid, exc)
    except Exception as exc:
        log.exception("agent operation failed")
        return encode_error(rid, EdgevisorError(f"internal error: {type(exc).__name__}: {exc}"))


def create_agent_app(
    router: OpRouter, key: KeyFn, *, body_limit_bytes: int = 64 * 1024 * 1024
) -> Starlette:
    async def healthz(_request: Request) -> Response:
        return JSONResponse({"status": "ok", "version": __version__})

    async def call_op(request: Request) -> Response:
        try:
            if not _authorized(request.headers.get("authorization", ""), key()):
                raise Unauthorized("agent operations need the controller's agent key")
            raw = await request.body()
            try:
                payload: Any = json.loads(raw) if raw else {}
            except ValueError as exc:
                raise RequestError(f"malformed JSON: {exc}") from exc
            result = await router.dispatch(request.path_params["name"], payload)
            return JSONResponse({"result": result})
        except EdgevisorError as exc:
            return JSONResponse(exc.to_payload(), status_code=exc.status)
        except Exception as exc:
            log.exception("agent operation failed")
            return _error(500, "internal", f"internal error: {type(exc).__name__}: {exc}")

    async def channel(ws: WebSocket) -> None:
        if not _authorized(ws.headers.get("authorization", ""), key()):
            await ws.close(code=CLOSE_POLICY)  # before accept: the upgrade gets a 403
            return
        await ws.accept()
        running: set[asyncio.Task[None]] = set()

        async def serve(rid: int, op: str, payload: Any) -> None:
            text = await _answer(router, rid, op, payload)
            # The controller may have gone away; it sends the call again over HTTP.
            with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
                await ws.send_text(text)

        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                frame = message.get("text") or message.get("bytes") or b""
                try:
                    req = decode_request(frame)
                except FrameError as exc:
                    if exc.id is None:
                        await ws.close(code=CLOSE_POLICY, reason=str(exc)[:100])
                        return
                    await ws.send_text(encode_error(exc.id, RequestError(str(exc))))
                    continue
                # A task per call: a slow op does not hold up the others. Calls already
                # running finish when the channel closes (their answers are lost; the
                # ops are idempotent and the controller sends them again).
                task = asyncio.create_task(serve(req.id, req.op, req.payload))
                running.add(task)
                task.add_done_callback(running.discard)
        except WebSocketDisconnect:
            return

    async def http_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = "not_found" if exc.status_code == 404 else "http_error"
        return _error(exc.status_code, code, str(exc.detail))

    return Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/agent/v1/ops/{name}", call_op, methods=["POST"]),
            WebSocketRoute(CHANNEL_PATH, channel),
        ],
        middleware=[Middleware(BodyLimit, limit=body_limit_bytes)],
        exception_handlers={HTTPException: http_error},
    )
