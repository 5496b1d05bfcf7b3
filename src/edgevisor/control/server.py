"""Running the controller: data-dir lock, store, admin token, the HTTP server.

``edgevisor up`` and ``edgevisor controller`` both come through :func:`serve`; ``up`` adds
an in-process agent once the API answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import uvicorn

from edgevisor.control.app import create_app
from edgevisor.control.state import ControllerState
from edgevisor.httpserver import QuietServer, bound_port
from edgevisor.settings import Settings
from edgevisor.store import repos
from edgevisor.store.engine import Store

log = logging.getLogger(__name__)
ADMIN_TOKEN_FILE = "admin.token"


def ensure_admin_token(st: ControllerState) -> Path:
    """Keep a valid admin token in ``<data_dir>/admin.token`` (mode 0600)."""
    path = st.settings.data_dir / ADMIN_TOKEN_FILE
    with st.store.session() as s:
        if path.exists():
            secret = path.read_text().strip()
            tok = repos.token_by_secret(s, secret)
            if tok is not None and tok.admin:
                return path
        _tok, secret = repos.create_token(s, name="admin", now=st.clock(), admin=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret + "\n")
    os.chmod(path, 0o600)
    return path


def open_store(settings: Settings) -> Store:
    """Open the store and bring its schema to head; StoreUnavailable if unreachable."""
    return Store(settings.store_url()).open()


async def serve(
    settings: Settings,
    *,
    on_ready: Callable[[ControllerState], Coroutine[Any, Any, None]] | None = None,
    announce: Callable[[str], None] = print,
) -> None:
    """Serve the API until cancelled or signalled; ``on_ready`` runs once it answers."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(settings)
    st = ControllerState(settings=settings, store=store)
    token_path = ensure_admin_token(st)
    app = create_app(st)
    cfg = uvicorn.Config(
        app,
        host=settings.controller.listen_host,
        port=settings.controller.listen_port,
        log_level="warning",
        lifespan="on",
        access_log=False,
    )
    # Signals are the process's (run_up/run_controller cancel the main task): uvicorn's own
    # handling re-raises SIGTERM after its shutdown, which killed the process before the
    # local agent's cleanup (environments, cgroups, mounts) could run.
    server = QuietServer(cfg)
    serve_task = asyncio.create_task(server.serve())
    while not server.started:
        if serve_task.done():
            await serve_task  # surfaces the bind error
            raise SystemExit(2)
        await asyncio.sleep(0.02)
    url = f"http://{settings.controller.listen_host}:{bound_port(server)}"
    announce(f"edgevisor controller listening on {url}")
    announce(f"admin token: {token_path}")
    extra: asyncio.Task[None] | None = None
    if on_ready is not None:
        extra = asyncio.create_task(on_ready(st))
    try:
        await serve_task
    finally:
        if extra is not None:
            extra.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await extra
        if not serve_task.done():  # cancelled by a signal: a graceful HTTP shutdown
            server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(serve_task, timeout=10)
        store.dispose()
