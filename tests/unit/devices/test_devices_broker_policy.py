"""Broker policy decisions (auth and ACL) without a network."""

from __future__ import annotations

from pathlib import Path

from amqtt.contexts import Action

from edgevisor.devices.broker import AGENT_USERNAME, BrokerPolicy
from edgevisor.devices.db import open_db
from edgevisor.devices.registry import DeviceRegistry


def _policy(tmp_path: Path) -> BrokerPolicy:
    reg = DeviceRegistry(open_db(tmp_path / "d.db"))
    reg.add("d1", "pw1")
    return BrokerPolicy(reg, "agent-secret")


async def test_devices_policy_authenticate(tmp_path: Path) -> None:
    p = _policy(tmp_path)
    assert await p.authenticate("d1", "pw1")
    assert await p.authenticate(AGENT_USERNAME, "agent-secret")
    assert not await p.authenticate(AGENT_USERNAME, "guess")
    assert not await p.authenticate("d1", "pw2")
    assert not await p.authenticate("ghost", "pw1")
    assert not await p.authenticate(None, None)
    assert not await p.authenticate("d1", None)
    assert (p.stats.connections_accepted, p.stats.connections_refused) == (2, 5)


def test_devices_policy_acl_counts_drops(tmp_path: Path) -> None:
    p = _policy(tmp_path)
    assert p.allow("d1", Action.PUBLISH, "devices/d1/t")
    assert not p.allow("d1", Action.PUBLISH, "devices/d2/t")
    assert not p.allow("d1", Action.PUBLISH, "edgevisor/shadow/d1/delta")
    assert not p.allow("d1", Action.SUBSCRIBE, "#")
    assert p.allow("d1", Action.SUBSCRIBE, "edgevisor/shadow/d1/delta")
    assert p.allow(AGENT_USERNAME, Action.PUBLISH, "anything/at/all")
    assert p.allow(AGENT_USERNAME, Action.SUBSCRIBE, "#")
    assert not p.allow(None, Action.PUBLISH, "devices/d1/t")
    stats = p.stats.to_json()
    assert stats["publishes_dropped"] == {"d1": 2}
    assert stats["publishes_dropped_total"] == 2
    assert stats["subscriptions_refused"] == {"d1": 1}
