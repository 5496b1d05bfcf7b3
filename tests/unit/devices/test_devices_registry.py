"""Device registry: hashed credentials, persistence, ACLs and route grants."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgevisor.devices import registry
from edgevisor.devices.db import open_db
from edgevisor.devices.registry import DeviceRegistry, hash_password, verify_password
from edgevisor.errors import AlreadyExists, NotFound, RequestError


def test_devices_password_hash_round_trip() -> None:
    h = hash_password("s3cret")
    assert h.startswith("scrypt$") and "s3cret" not in h
    assert verify_password("s3cret", h)
    assert not verify_password("s3cret!", h)
    assert not verify_password("s3cret", "garbage")
    assert hash_password("s3cret") != h  # salted


def test_devices_generated_password_never_starts_with_a_dash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A leading "-" made argparse clients (examples/devices/sensor.py) read it as an option.
    drawn = iter(["-leading-dash-pw", "-again", "fine-pw_123"])
    monkeypatch.setattr(registry.secrets, "token_urlsafe", lambda n: next(drawn))
    assert registry.new_password() == "fine-pw_123"


def test_devices_registry_stores_only_the_hash(tmp_path: Path) -> None:
    path = tmp_path / "devices.db"
    reg = DeviceRegistry(open_db(path))
    reg.add("d1", "pw-one")
    generated = reg.add("d2")
    assert len(generated) >= 16
    assert b"pw-one" not in path.read_bytes()
    reopened = DeviceRegistry(open_db(path))
    assert [d.name for d in reopened.devices()] == ["d1", "d2"]
    assert reopened.verify("d1", "pw-one")
    assert reopened.verify("d2", generated)
    assert not reopened.verify("d1", "wrong")
    assert not reopened.verify("ghost", "pw-one")


def test_devices_registry_errors(tmp_path: Path) -> None:
    reg = DeviceRegistry(open_db(tmp_path / "d.db"))
    reg.add("d1", "x")
    with pytest.raises(AlreadyExists):
        reg.add("d1", "y")
    for bad in ("", "_agent", "a/b", "a+b", "#", "x" * 64):
        with pytest.raises(RequestError):
            reg.add(bad, "pw")
    with pytest.raises(NotFound):
        reg.remove("ghost")
    reg.remove("d1")
    assert not reg.exists("d1")


def test_devices_acl_own_topics_and_grants(tmp_path: Path) -> None:
    reg = DeviceRegistry(open_db(tmp_path / "d.db"))
    reg.add("d1", "x")
    acl = reg.acl("d1")
    assert acl.may_publish("devices/d1/temp")
    assert acl.may_publish("edgevisor/shadow/d1/update")
    assert not acl.may_publish("edgevisor/shadow/d1/delta")  # only the agent writes deltas
    assert not acl.may_publish("devices/d2/temp")
    assert not acl.may_publish("plant/temp")
    assert acl.may_subscribe("edgevisor/shadow/d1/#")
    assert acl.may_subscribe("devices/d1/+/cmd")
    assert not acl.may_subscribe("devices/+/temp")
    assert not acl.may_subscribe("#")
    reg.set_grants({"d1": (["plant/+/temp"], ["plant/replies/d1"])})
    acl = reg.acl("d1")
    assert acl.may_publish("plant/7/temp")
    assert acl.may_subscribe("plant/replies/d1")
    assert not acl.may_subscribe("plant/replies/+")
    lines = reg.acl_lines()
    assert "user d1" in lines and "topic write plant/+/temp" in lines
