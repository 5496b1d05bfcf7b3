"""The agent's HTTP API: the controller calls agent operations here.

Only the controller holds the per-host agent key, handed over at join; every call must
present it. Errors leave as the same ``{"error": {...}}`` bodies as the controller's.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from edgevisor import __version__
from edgevisor.agent.rpc import OpRouter
from edgevisor.control import http_errors
from edgevisor.errors import RequestError, Unauthorized

KeyFn = Callable[[], str | None]


def create_agent_app(
    router: OpRouter, key: KeyFn, *, body_limit_bytes: int = 64 * 1024 * 1024
) -> FastAPI:
    app = FastAPI(title="edgevisor agent", version=__version__, openapi_url=None, docs_url=None)
    http_errors.install(app)
    app.add_middleware(http_errors.BodyLimit, limit=body_limit_bytes)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    @app.post("/agent/v1/ops/{name}")
    async def call_op(name: str, request: Request) -> JSONResponse:
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
        result = await router.dispatch(name, payload)
        return JSONResponse({"result": result})

    return app

