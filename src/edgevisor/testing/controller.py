"""A real controller (uvicorn + store) in a background thread, for tests and benchmarks."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from edgevisor.control.app import create_app
from edgevisor.control.server import ensure_admin_token, open_store
from edgevisor.control.state import ControllerState
from edgevisor.httpserver import bound_port
from edgevisor.settings import Settings, load_settings


@dataclass
class RunningController:
    url: str
    admin_token: str
    settings: Settings
    state: ControllerState


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextmanager
def running_controller(
    data_dir: Path, overrides: dict[str, Any] | None = None, host: str = "127.0.0.1"
) -> Iterator[RunningController]:
    """Start a controller on a free port; stop it and dispose the store on exit."""
    settings = load_settings(
        overrides={
            "data_dir": str(data_dir),
            "controller.listen_host": host,
            "controller.listen_port": 0,
            **(overrides or {}),
        },
        environ={},
    )
    data_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(settings)
    st = ControllerState(settings=settings, store=store)
    token = ensure_admin_token(st).read_text().strip()
    server = uvicorn.Server(
        uvicorn.Config(create_app(st), host=host, port=0, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("controller did not start")
        time.sleep(0.02)
    try:
        yield RunningController(f"http://{host}:{bound_port(server)}", token, settings, st)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        store.dispose()
