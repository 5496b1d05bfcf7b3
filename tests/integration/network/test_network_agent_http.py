"""Records pushes over aiohttp (control.agent_http) against a real agent HTTP app.

The contract is AgentLinks': the op's result, the agent's typed error re-raised, and
PeerUnavailable for an agent that is not there or does not answer in time; a kept-alive
connection that the agent closed meanwhile does not fail a call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn

from edgevisor.agent.rpc import OpRouter
from edgevisor.agent.server import create_agent_app
from edgevisor.control.agent_http import AgentHttp
from edgevisor.errors import Conflict, PeerUnavailable, Unauthorized
from edgevisor.httpserver import QuietServer, bound_port
from edgevisor.testing.controller import free_port

KEY = "agent-key"


@pytest.fixture
async def agent() -> AsyncIterator[str]:
    router = OpRouter()
    seen: list[Any] = []

    async def apply(payload: dict[str, Any]) -> Any:
        seen.append(payload)
        return {
            "reports": [
                {"record_id": r["id"], "generation": r["generation"], "error": None}
                for r in payload["records"]
            ],
            "error": None,
        }

    async def refuse(_payload: dict[str, Any]) -> Any:
        raise Conflict("generation 3 is behind 4")

    async def slow(_payload: dict[str, Any]) -> Any:
        await asyncio.sleep(1.5)

    router.add("records.apply", apply)
    router.add("records.refuse", refuse)
    router.add("records.slow", slow)
    server = QuietServer(
        uvicorn.Config(
            create_agent_app(router, lambda: KEY),
            host="127.0.0.1",
            port=0,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_keep_alive=0.3,
        )
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "agent app did not start"
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{bound_port(server)}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def test_result_errors_and_kept_alive_connections(agent: str) -> None:
    http = AgentHttp()
    body = {"full": False, "removed": [], "records": [{"id": 7, "generation": 3}]}
    try:
        got = await http.call("h1", "records.apply", body, endpoint=(agent, KEY), timeout_s=10)
        assert got == {"reports": [{"record_id": 7, "generation": 3, "error": None}], "error": None}
        with pytest.raises(Conflict, match="generation 3 is behind 4"):
            await http.call("h1", "records.refuse", {}, endpoint=(agent, KEY), timeout_s=10)
        with pytest.raises(Unauthorized):
            await http.call("h1", "records.apply", body, endpoint=(agent, "wrong"), timeout_s=10)
        # The agent closes idle connections after 0.3 s; the next call still succeeds.
        await asyncio.sleep(0.8)
        got = await http.call("h1", "records.apply", body, endpoint=(agent, KEY), timeout_s=10)
        assert got["reports"][0]["record_id"] == 7
    finally:
        await http.aclose()


async def test_unreachable_or_silent_agent_is_peer_unavailable(agent: str) -> None:
    http = AgentHttp()
    try:
        with pytest.raises(PeerUnavailable, match="host 'h1' is unreachable"):
            await http.call("h1", "records.slow", {}, endpoint=(agent, KEY), timeout_s=0.3)
        nobody = f"http://127.0.0.1:{free_port()}"
        with pytest.raises(PeerUnavailable, match="host 'h2' is unreachable"):
            await http.call("h2", "records.apply", {}, endpoint=(nobody, KEY), timeout_s=5)
    finally:
        await http.aclose()
