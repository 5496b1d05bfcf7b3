"""Every error leaves the API as ``{"error": {"code", "message"}}`` with the right status.

Third-party exceptions are converted at this boundary: Starlette's HTTP errors (unknown
route, wrong method), FastAPI's validation errors (malformed JSON gets 400 with the
position), and an oversize body (413, enforced while streaming, not only by the header).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgevisor.errors import EdgevisorError, TooManyRequests
from edgevisor.httpserver import BodyLimit

__all__ = ["BodyLimit", "error_response", "install"]

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
