"""The move's fast path in front of FastAPI (control.api_move_fast) in a real controller.

The common case (cached token, valid body, a move the SQLite hot path makes) is served
by the middleware with the route's answer; everything else reaches the FastAPI route
unchanged (body replayed) and gets the route's answer and errors. Either way a move
writes exactly one history row.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from edgevisor import Client
from edgevisor.control.api_move_fast import MoveFastPath, install
from edgevisor.control.app import create_app
from edgevisor.control.server import ensure_admin_token, open_store
from edgevisor.control.state import ControllerState
from edgevisor.httpserver import bound_port
from edgevisor.settings import load_settings

CAP = {"cpu_count": 1, "memory_mb": 64, "disk_mb": 64}


class Ctl:
    def __init__(self, url: str, token: str, app: Any) -> None:
        self.url, self.admin_token, self.app = url, token, app

    def served(self) -> int:
        """Moves the middleware served so far (0 before the app's first request)."""
        node = getattr(self.app, "middleware_stack", None)
        while node is not None:
            if isinstance(node, MoveFastPath):
                return node.served
            node = getattr(node, "app", None)
        return 0


@contextmanager
def controller(data_dir: Path) -> Iterator[Ctl]:
    settings = load_settings(
        overrides={
            "data_dir": str(data_dir),
            "controller.listen_host": "127.0.0.1",
            "controller.listen_port": 0,
            "network.reconcile_interval_s": 30.0,
        },
        environ={},
    )
    data_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(settings)
    st = ControllerState(settings=settings, store=store)
    token = ensure_admin_token(st).read_text().strip()
    app = create_app(st)
    install(app, st)
    install(app, st)  # a second install does nothing
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "controller did not start"
        time.sleep(0.02)
    try:
        yield Ctl(f"http://127.0.0.1:{bound_port(server)}", token, app)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        store.dispose()


@pytest.fixture
def ctl(tmp_path: Path) -> Iterator[Ctl]:
    with controller(tmp_path / "ctl") as c:
        with Client(c.url, c.admin_token) as admin:
            for name in ("h1", "h2"):
                jt = admin.create_join_token(host=name).secret
                httpx.post(
                    f"{c.url}/v1/hosts/join",
                    json={"name": name, "join_token": jt, "capacity": CAP},
                ).raise_for_status()
            admin.create_physical_pool("10.251.98.0/24")
            admin.create_account("acme")
            admin.create_network("net", "10.0.0.0/24", account="acme")
            admin.allocate_address("net", "10.0.0.9", account="acme")
            admin.bind_address("10.0.0.9", "i1", "h1", account="acme")
        yield c


def test_common_move_is_served_in_front_with_the_routes_answer(ctl: Ctl) -> None:
    auth = {"authorization": f"Bearer {ctl.admin_token}"}
    with httpx.Client(base_url=ctl.url, headers=auth) as http:
        http.get("/v1/addresses/10.0.0.9", params={"account": "acme"}).raise_for_status()
        before = ctl.served()
        gens = []
        for dst in ("h2", "h1", "h2"):
            r = http.post("/v1/addresses/10.0.0.9/move", json={"host": dst, "account": "acme"})
            assert r.status_code == 200, r.text
            assert r.headers["content-type"] == "application/json"
            moved = r.json()
            read = http.get("/v1/addresses/10.0.0.9", params={"account": "acme"}).json()
            assert moved == read
            assert moved["host"] == dst
            gens.append(moved["generation"])
        assert ctl.served() == before + 3
        assert gens == [gens[0], gens[0] + 1, gens[0] + 2]
        hist = http.get("/v1/addresses/10.0.0.9/history", params={"account": "acme"}).json()
        assert [h["event"] for h in hist].count("move") == 3


def test_everything_else_reaches_the_route_unchanged(ctl: Ctl) -> None:
    auth = {"authorization": f"Bearer {ctl.admin_token}"}
    with httpx.Client(base_url=ctl.url, headers=auth) as http:
        rec = http.get("/v1/addresses/10.0.0.9", params={"account": "acme"}).json()
        served = ctl.served()
        # A stale generation: the route's typed refusal, nothing changed.
        r = http.post(
            "/v1/addresses/10.0.0.9/move",
            json={"host": "h2", "account": "acme", "expected_generation": 1},
        )
        assert r.status_code == 409 and r.json()["error"]["code"]
        # An invalid body: the route's validation error.
        r = http.post("/v1/addresses/10.0.0.9/move", json={"account": "acme"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"
        r = http.post(
            "/v1/addresses/10.0.0.9/move",
            content=b"{nope",
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 400
        # An unknown token, and none at all: 401 from the route.
        for headers in ({"authorization": "Bearer nope"}, {"authorization": ""}):
            r = http.post(
                "/v1/addresses/10.0.0.9/move",
                headers=headers,
                json={"host": "h2", "account": "acme"},
            )
            assert r.status_code == 401
        # An unknown host: the route names it.
        r = http.post("/v1/addresses/10.0.0.9/move", json={"host": "h9", "account": "acme"})
        assert r.status_code == 404 and "h9" in r.json()["error"]["message"]
        # Admin without an account: the route says so.
        r = http.post("/v1/addresses/10.0.0.9/move", json={"host": "h2"})
        assert r.status_code == 400
        assert ctl.served() == served
        same = http.get("/v1/addresses/10.0.0.9", params={"account": "acme"}).json()
        assert same == rec
        # By record id: the route serves it (it checks the owner first), same answer.
        r = http.post(f"/v1/addresses/{rec['id']}/move", json={"host": "h2", "account": "acme"})
        assert r.status_code == 200, r.text
        assert r.json()["host"] == "h2" and r.json()["generation"] == rec["generation"] + 1
        assert ctl.served() == served
        hist = http.get("/v1/addresses/10.0.0.9/history", params={"account": "acme"}).json()
        assert [h["event"] for h in hist].count("move") == 1

