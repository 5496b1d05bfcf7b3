"""Running the controller: data-dir lock, store, admin token, the HTTP server.

``edgevisor up`` and ``edgevisor controller`` both come through :func:`serve`; ``up`` adds
an in-process agent once the API answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import IO, Any

import uvicorn

from edgevisor.control.app import create_app
from edgevisor.control.state import ControllerState
from edgevisor.errors import Conflict
from edgevisor.settings import Settings
from edgevisor.store import repos
from edgevisor.store.engine import Store

log = logging.getLogger(__name__)
ADMIN_TOKEN_FILE = "admin.token"


class DataDirLock:
    """An exclusive ``flock`` on ``<data_dir>/edgevisor.lock``; released on process exit."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "edgevisor.lock"
        self._fh: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")  # noqa: SIM115 (held for the life of the process)
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise Conflict(
                f"data dir {self.path.parent} is in use by {holder}; "
                "stop it first or pass another --data-dir"
            ) from exc
        fh.seek(0)
        fh.truncate()
        fh.write(f"edgevisor pid {os.getpid()}\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


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
    server = uvicorn.Server(cfg)
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
        store.dispose()


class QuietServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the process that embeds it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bound_port(server: uvicorn.Server) -> int:
    for srv in server.servers:
        for sock in srv.sockets:
            return int(sock.getsockname()[1])
    return 0
