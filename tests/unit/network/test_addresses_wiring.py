"""Pure parts of the address wiring: push targets, the agent's record view, settings."""

from __future__ import annotations

from datetime import UTC, datetime
from ipaddress import IPv4Address

import pytest

from edgevisor.agent.addresses import WireRecord
from edgevisor.control.addr_sync import Push
from edgevisor.errors import RequestError
from edgevisor.network.config import AUTO_FABRIC, NetworkSettings
from edgevisor.network.lifecycle import State
from edgevisor.network.records import AddressRecord
from edgevisor.settings import load_settings

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _rec(host: str | None = "h2") -> AddressRecord:
    return AddressRecord(id=1, account="a", network_id=1, logical="10.0.0.7",
                         physical="10.9.0.7" if host else None, host=host,
                         instance="i" if host else None,
                         state=State.BOUND if host else State.PRESERVED, generation=3,
                         held_until=None, created_at=NOW, updated_at=NOW)


def test_hosts_in_both_sets_get_the_delta_others_the_full_set() -> None:
    p = Push(_rec(), before={"h1", "h3"}, after={"h1", "h2"}, first=None)
    assert p.targets() == [("h1", False), ("h2", True), ("h3", True)]


def test_the_host_giving_up_the_mapping_is_pushed_first() -> None:
    p = Push(_rec(), before={"h1", "h3"}, after={"h1", "h3", "h2"}, first="h3")
    assert p.targets()[0] == ("h3", False)
    assert sorted(p.targets()[1:]) == [("h1", False), ("h2", True)]
    assert Push(_rec(), before=set(), after=set()).targets() == []


def test_only_bound_records_translate_on_the_agent() -> None:
    raw = {"id": 1, "account": "a", "logical": "10.0.0.7", "physical": "10.9.0.7",
           "host": "h2", "state": "bound", "generation": 3}
    ar = WireRecord.parse(raw).applied()
    assert (ar.state, ar.physical, ar.host) == ("active", IPv4Address("10.9.0.7"), "h2")
    assert WireRecord.parse(raw).applied(removed=True).state == "released"
    gone = WireRecord.parse(raw | {"state": "preserved", "physical": None, "host": None})
    assert gone.applied().state == "released" and gone.applied().key == ("a", ar.logical)
    with pytest.raises(RequestError):
        WireRecord.parse({"id": 1})
    with pytest.raises(RequestError):
        WireRecord.parse([1])


def test_network_settings_defaults_and_environment() -> None:
    s = NetworkSettings()
    assert s.dataplane.fabric_if == AUTO_FABRIC
    assert s.ipam().hold_down_s == s.hold_down_s == 300.0
    env = {"EDGEVISOR_NETWORK__HOLD_DOWN_S": "5", "EDGEVISOR_NETWORK__DATAPLANE__FABRIC_IF": "eth1",
           "EDGEVISOR_NETWORK__DATAPLANE_MODE": "off"}
    loaded = load_settings(environ=env).network
    assert loaded.hold_down_s == 5.0 and loaded.dataplane.fabric_if == "eth1"
    assert not loaded.dataplane_enabled()
    for name, info in NetworkSettings.model_fields.items():
        assert info.description, name
