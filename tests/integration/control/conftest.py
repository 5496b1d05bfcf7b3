"""Fixtures for the push path's integration tests: real agent apps under uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import uvicorn

from edgevisor.agent.rpc import OpRouter
from edgevisor.agent.server import create_agent_app
from edgevisor.httpserver import QuietServer, bound_port

ServeFn = Callable[..., contextlib.AbstractAsyncContextManager[str]]


class HttpCount:
    """ASGI wrapper counting the HTTP requests that reach an app (channel calls are
    not HTTP requests)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.http = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.http += 1
        await self.app(scope, receive, send)


@contextlib.asynccontextmanager
async def serve_agent(
    router: OpRouter,
    key: str,
    *,
    port: int = 0,
    ws: str = "auto",
    counter: list[HttpCount] | None = None,
) -> AsyncIterator[str]:
    """The agent's app for ``router`` on 127.0.0.1 (``port`` 0: any); its URL."""
    app = HttpCount(create_agent_app(router, lambda: key))
    if counter is not None:
        counter.append(app)
    server = QuietServer(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            ws=ws,
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
    )
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not task.done(), "agent app did not start"
            await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{bound_port(server)}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 20)


@pytest.fixture
def serve() -> ServeFn:
    return serve_agent
