"""The controller's HTTP application: routers, error mapping, body limit, background loops."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, FastAPI

from edgevisor import __version__
from edgevisor.control import (
    api_accounts,
    api_addresses,
    api_devices,
    api_domains,
    api_events,
    api_hosts,
    api_migrations,
    api_move_fast,
    api_tasks,
    api_volumes,
    deployments,
    http_errors,
    pki,
)
from edgevisor.control.addr_loops import run_leak_collector, run_records_reconciler
from edgevisor.control.auth import Principal, require_principal
from edgevisor.control.reconciler import run_liveness
from edgevisor.control.state import ControllerState
from edgevisor.migration.runner import run_migrations
from edgevisor.sdk import models as m

Loop = Callable[[ControllerState], Coroutine[Any, Any, None]]
# Reconcilers the controller runs for its whole life; each capability adds its own.
BACKGROUND_LOOPS: list[Loop] = [run_liveness]
BACKGROUND_LOOPS += [run_records_reconciler, run_leak_collector]
BACKGROUND_LOOPS += [pki.ensure_fleet_ca]  # a start-up step: returns once the CA exists
BACKGROUND_LOOPS += [api_domains.run_domain_status]
BACKGROUND_LOOPS += [run_migrations]


def create_app(st: ControllerState, *, background: bool = True) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(loop(st)) for loop in BACKGROUND_LOOPS] if background else []
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t

    app = FastAPI(
        title="edgevisor",
        version=__version__,
        # Served below behind a token: every endpoint but /healthz is authenticated.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
        responses={"default": {"model": m.ErrorResponse, "description": "Error"}},
    )
    app.state.controller = st
    http_errors.install(app)
    api_move_fast.install(app, st)  # the common move, in front of FastAPI's routing
    app.add_middleware(
        http_errors.BodyLimit,
        limit=st.settings.controller.body_limit_bytes,
        exceptions={("POST", "/v1/tasks"): st.settings.controller.bundle_limit_bytes},
    )

    @app.get("/healthz", response_model=m.Health, tags=["health"])
    def healthz() -> m.Health:
        return m.Health(version=__version__)

    @app.get("/v1/openapi.json", include_in_schema=False)
    def openapi(_p: Annotated[Principal, Depends(require_principal)]) -> dict[str, Any]:
        return app.openapi()

    app.include_router(api_accounts.router, tags=["accounts"])
    app.include_router(api_hosts.router, tags=["hosts"])
    app.include_router(api_events.router, tags=["events"])
    app.include_router(api_addresses.router, tags=["addresses"])
    app.include_router(api_tasks.router, tags=["tasks"])
    app.include_router(api_devices.router, tags=["devices"])
    app.include_router(deployments.router, tags=["deployments"])
    app.include_router(api_volumes.router, tags=["volumes"])
    app.include_router(api_domains.router, tags=["domains"])
    app.include_router(api_migrations.router, tags=["migrations"])
    app.include_router(pki.router, tags=["hosts"])
    return app
