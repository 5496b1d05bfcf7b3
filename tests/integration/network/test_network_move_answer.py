"""The move's answer is serialized by the handler itself (not by FastAPI's response
model): it must be the same JSON a read of the record gives, on the fast SQLite path and
on the Session path (PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgevisor import Client
from edgevisor.testing.controller import RunningController, running_controller

CAP = {"cpu_count": 1, "memory_mb": 64, "disk_mb": 64}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def ctl(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningController]:
    overrides: dict[str, Any] = {"network.reconcile_interval_s": 30.0}
    if request.param == "postgres":
        overrides["controller.store_url"] = request.getfixturevalue(
            "postgres_server"
        ).create_database()
    with running_controller(tmp_path / "ctl", overrides) as c:
        yield c


def test_move_answer_is_the_record_as_read(ctl: RunningController) -> None:
    with Client(ctl.url, ctl.admin_token) as admin:
        for name in ("h1", "h2"):
            jt = admin.create_join_token(host=name).secret
            httpx.post(
                f"{ctl.url}/v1/hosts/join", json={"name": name, "join_token": jt, "capacity": CAP}
            ).raise_for_status()
        admin.create_physical_pool("10.251.98.0/24")
        admin.create_account("acme")
        admin.create_network("net", "10.0.0.0/24", account="acme")
        admin.allocate_address("net", "10.0.0.9", account="acme")
        bound = admin.bind_address("10.0.0.9", "i1", "h1", account="acme")
    auth = {"authorization": f"Bearer {ctl.admin_token}"}
    with httpx.Client(base_url=ctl.url, headers=auth) as http:
        r = http.post("/v1/addresses/10.0.0.9/move", json={"host": "h2", "account": "acme"})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/json"
        moved = r.json()
        assert (moved["host"], moved["generation"]) == ("h2", bound.generation + 1)
        assert moved["physical"] != bound.physical
        read = http.get("/v1/addresses/10.0.0.9", params={"account": "acme"})
        assert read.status_code == 200
        assert moved == read.json()
        # A refusal still comes as the typed error body.
        again = http.post(
            "/v1/addresses/10.0.0.9/move",
            json={"host": "h2", "account": "acme", "expected_generation": 1},
        )
        assert again.status_code == 409
        assert again.json()["error"]["code"]
