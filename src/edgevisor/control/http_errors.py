"""Every error leaves the API as ``{"error": {"code", "message"}}`` with the right status.

Third-party exceptions are converted at this boundary: Starlette's HTTP errors (unknown
route, wrong method), FastAPI's validation errors (malformed JSON gets 400 with the
position), and an oversize body (413, enforced while streaming, not only by the header).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgevisor.errors import EdgevisorError, PayloadTooLarge, TooManyRequests

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}


def error_response(status: int, code: str, message: str, **details: Any) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message}
    if details:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status)


def _describe_validation(exc: RequestValidationError) -> tuple[str, dict[str, Any]]:
    errors = exc.errors()
    for err in errors:
        if err.get("type") == "json_invalid":
            loc = err.get("loc", ())
            pos = loc[1] if len(loc) > 1 else None
            reason = (err.get("ctx") or {}).get("error", "invalid JSON")
            return f"malformed JSON at position {pos}: {reason}", {"position": pos}
    parts = []
    for err in errors[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg')}")
    return "invalid request: " + "; ".join(parts), {"fields": [p.split(":")[0] for p in parts]}


def install(app: FastAPI) -> None:
    @app.exception_handler(EdgevisorError)
    async def _ours(_req: Request, exc: EdgevisorError) -> JSONResponse:
        resp = JSONResponse(exc.to_payload(), status_code=exc.status)
        if isinstance(exc, TooManyRequests):
            resp.headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
        return resp

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        message = str(exc.detail) if exc.detail else code
        if exc.status_code == 404:
            message = "no such route"
        return error_response(exc.status_code, code, message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, exc: RequestValidationError) -> JSONResponse:
        message, details = _describe_validation(exc)
        return error_response(400, "invalid_request", message, **details)

    @app.exception_handler(Exception)
    async def _bug(_req: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in request")
        return error_response(500, "internal", f"internal error: {type(exc).__name__}")


def _replay(messages: list[Message], then: Receive | None = None) -> Receive:
    queue = list(messages)

    async def receive() -> Message:
        if queue:
            return queue.pop(0)
        if then is not None:
            return await then()  # e.g. http.disconnect while a stream is open
        return {"type": "http.disconnect"}

    return receive


class BodyLimit:
    """ASGI middleware: refuse bodies over the limit with 413, by header or while reading.

    ``exceptions`` maps ``(method, path)`` to its own limit (bundle uploads are larger).
    """

    def __init__(
        self, app: ASGIApp, limit: int, exceptions: dict[tuple[str, str], int] | None = None
    ) -> None:
        self.app = app
        self.limit = limit
        self.exceptions = exceptions or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.exceptions.get((scope["method"], scope["path"]), self.limit)
        for key, value in scope.get("headers", []):
            if key == b"content-length" and value.isdigit() and int(value) > limit:
                await _reject(limit, send)
                return
        # Read the body up to the limit first and replay it: a parser downstream would turn
        # an error raised mid-stream into a 400.
        chunks: list[bytes] = []
        seen = 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                await self.app(scope, _replay([msg]), send)
                return
            chunk = msg.get("body", b"")
            seen += len(chunk)
            if seen > limit:
                await _reject(limit, send)
                return
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], receive), send)


async def _reject(limit: int, send: Send) -> None:
    exc = PayloadTooLarge(f"request body is over the limit of {limit} bytes")
    body = json.dumps(exc.to_payload()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
