"""The domains capability without isolation: refusals with the reason, nothing created."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgevisor.agent import domains as domains_mod
from edgevisor.agent.daemon import Agent
from edgevisor.agent.domains import DomainsCapability
from edgevisor.errors import NotFound, RequestError, UnavailableError
from edgevisor.settings import load_settings


@pytest.fixture
async def cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> DomainsCapability:
    monkeypatch.setattr(domains_mod, "_missing_isolation", lambda: "the agent is not root")
    settings = load_settings(
        overrides={"data_dir": str(tmp_path), "agent.host_name": "plain"}, environ={}
    )
    agent = Agent(settings)
    c = DomainsCapability(settings)
    await c.start(agent)
    c.agent = agent  # type: ignore[attr-defined]
    return c


async def test_create_refused_with_the_reason_when_isolation_is_missing(
    cap: DomainsCapability, tmp_path: Path
) -> None:
    agent: Agent = cap.agent  # type: ignore[attr-defined]
    payload = {
        "account": "acme",
        "name": "kv",
        "command": ["/bin/true"],
        "volume_size_bytes": 1 << 24,
    }
    with pytest.raises(UnavailableError, match="not root"):
        await agent.router.dispatch("domains.create", payload)
    assert await agent.router.dispatch("domains.list", {}) == []
    assert list((agent.dir / "domains").iterdir()) == []
    with pytest.raises(NotFound):
        await agent.router.dispatch("domains.start", {"account": "acme", "name": "kv"})


@pytest.mark.parametrize(
    "bad",
    [
        {"name": "Bad_Name"},
        {"command": []},
        {"command": "not a list"},
        {"restart": "sometimes"},
        {"volume_size_bytes": 0},
    ],
)
async def test_bad_create_payloads_are_request_errors(
    cap: DomainsCapability, bad: dict[str, object]
) -> None:
    agent: Agent = cap.agent  # type: ignore[attr-defined]
    cap.missing = ""  # validation comes first anyway; nothing may start
    payload = {
        "account": "acme", "name": "kv", "command": ["/bin/true"], "volume_size_bytes": 1 << 24,
        **bad,
    }  # fmt: skip
    with pytest.raises(RequestError):
        await agent.router.dispatch("domains.create", payload)
    assert cap.domains == {}
