"""The agent's HTTP API: the controller calls agent operations here.

Only the controller holds the per-host agent key, handed over at join; every call must
present it. Errors leave as the same ``{"error": {...}}`` bodies as the controller's.
Plain Starlette rather than FastAPI: two routes need no schema, and the agent stays lean.
"""

from __future__ import annotations

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
from starlette.routing import Route

from edgevisor import __version__
from edgevisor.agent.rpc import OpRouter
from edgevisor.errors import EdgevisorError, RequestError, Unauthorized
from edgevisor.httpserver import BodyLimit

log = logging.getLogger(__name__)
KeyFn = Callable[[], str | None]


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def create_agent_app(
    router: OpRouter, key: KeyFn, *, body_limit_bytes: int = 64 * 1024 * 1024
) -> Starlette:
    async def healthz(_request: Request) -> Response:
        return JSONResponse({"status": "ok", "version": __version__})

    async def call_op(request: Request) -> Response:
        try:
            expected = key()
            header = request.headers.get("authorization", "")
            scheme, _, secret = header.partition(" ")
            if (
                not expected
                or scheme.lower() != "bearer"
                or not hmac.compare_digest(secret.strip().encode(), expected.encode())
            ):
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

    async def http_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = "not_found" if exc.status_code == 404 else "http_error"
        return _error(exc.status_code, code, str(exc.detail))

    return Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/agent/v1/ops/{name}", call_op, methods=["POST"]),
        ],
        middleware=[Middleware(BodyLimit, limit=body_limit_bytes)],
        exception_handlers={HTTPException: http_error},
    )
