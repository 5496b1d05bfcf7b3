"""Controller -> agent operations over the agent's authenticated HTTP API."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from edgevisor import Client, NotFound, PeerUnavailable
from edgevisor.agent.daemon import Agent
from edgevisor.settings import load_settings
from edgevisor.testing.controller import RunningController


async def _wait_up(admin: Client, name: str) -> None:
    for _ in range(300):
        hosts = await asyncio.to_thread(admin.list_hosts)
        if any(h.name == name and h.state == "up" for h in hosts):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} never came up")


async def test_controller_calls_agent_ops(
    ctl: RunningController, admin: Client, tmp_path: Path
) -> None:
    jt = admin.create_join_token(host="edge-a")
    settings = load_settings(
        overrides={
            "data_dir": str(tmp_path / "agent"),
            "agent.controller_url": ctl.url,
            "agent.host_name": "edge-a",
            "agent.join_token": jt.secret,
            "agent.listen_port": 0,
            "agent.heartbeat_interval_s": 0.2,
            "network.dataplane_mode": "off",
            "devices.broker_port": 0,
        },
        environ={},
    )
    agent = Agent(settings)
    task = asyncio.create_task(agent.run())
    try:
        await _wait_up(admin, "edge-a")
        info = await ctl.state.links.call("edge-a", "agent.info", {})
        assert info["host"] == "edge-a"
        assert "agent.info" in info["ops"]
        with pytest.raises(NotFound, match="no operation"):
            await ctl.state.links.call("edge-a", "nope.op", {})
        # Only the controller's key opens the agent API.
        assert agent.api_url is not None
        async with httpx.AsyncClient() as http:
            r = await http.post(f"{agent.api_url}/agent/v1/ops/agent.info", json={})
            assert r.status_code == 401
            r = await http.post(
                f"{agent.api_url}/agent/v1/ops/agent.info",
                json={},
                headers={"authorization": "Bearer " + "x" * 43},
            )
            assert r.status_code == 401
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    with pytest.raises(PeerUnavailable):
        await ctl.state.links.call("edge-a", "agent.info", {}, timeout_s=2)
