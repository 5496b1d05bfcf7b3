"""The device service against the real mosquitto command-line clients as devices."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from devices_mqtt_helpers import free_port, pub, sub, wait_for

from edgevisor.devices.broker import AGENT_USERNAME
from edgevisor.devices.routes import Route, ToController, ToShadow, ToTask
from edgevisor.devices.spool import SpoolItem
from edgevisor.errors import PeerUnavailable

Make = Callable[..., Awaitable[Any]]  # conftest.make_service -> Harness


@pytest.mark.parametrize("link", ["inprocess", "client"])
async def test_devices_route_calls_task_and_reply_arrives(make_service: Make, link: str) -> None:
    h = await make_service(link=link)
    h.svc.add_device("d1", "pw1")
    await h.svc.add_route(Route("temp", "devices/+/temp", ToTask("thermo", "devices/d1/reply")))
    async with sub(h.port, "d1", "pw1", "devices/d1/reply") as s:
        assert s.codes == [0]
        rc, err = await pub(h.port, "d1", "pw1", "devices/d1/temp", '{"temp": 31}')
        assert rc == 0, err
        [(topic, payload)] = await s.messages(1)
    assert topic == "devices/d1/reply"
    assert json.loads(payload) == {"task": "thermo", "got": {"temp": 31}}
    assert h.calls == [
        ("thermo", {"topic": "devices/d1/temp", "source": "d1", "payload": {"temp": 31}})
    ]


async def test_devices_bad_credentials_refused(make_service: Make) -> None:
    h = await make_service()
    h.svc.add_device("d1", "pw1")
    rc, err = await pub(h.port, "d1", "wrong", "devices/d1/x", "1")
    assert rc != 0 and "not authorised" in err
    rc, err = await pub(h.port, "ghost", "pw1", "devices/ghost/x", "1")
    assert rc != 0 and "not authorised" in err
    rc, err = await pub(h.port, None, None, "devices/d1/x", "1")
    assert rc != 0 and "not authorised" in err
    stats = h.svc.stats()["broker"]
    assert stats["connections_refused"] == 3


async def test_devices_publish_outside_acl_dropped_and_counted(make_service: Make) -> None:
    h = await make_service()
    h.svc.add_device("d1", "pw1")
    h.svc.add_device("d2", "pw2")
    await h.svc.add_route(Route("temp", "devices/+/temp", ToTask("thermo")))
    # d1 pretends to be d2: the broker drops it, so the route never sees it.
    rc, _ = await pub(h.port, "d1", "pw1", "devices/d2/temp", '{"temp": 99}')
    assert rc == 0  # MQTT 3.1.1 has no way to refuse a PUBLISH; it is dropped
    await wait_for(lambda: h.svc.stats()["broker"]["publishes_dropped"].get("d1") == 1)
    rc, _ = await pub(h.port, "d2", "pw2", "devices/d2/temp", '{"temp": 20}')
    await wait_for(lambda: len(h.calls) == 1)
    await asyncio.sleep(0.3)
    assert [c[1]["payload"] for c in h.calls] == [{"temp": 20}]
    # Subscribing outside the ACL is refused with SUBACK 0x80.
    async with sub(h.port, "d1", "pw1", "devices/d2/#", "devices/d1/#") as s:
        assert s.codes == [128, 0]


@pytest.mark.parametrize("link", ["inprocess", "client"])
async def test_devices_malformed_json_goes_to_dead_letter(make_service: Make, link: str) -> None:
    h = await make_service(link=link)
    h.svc.add_device("d1", "pw1")
    await h.svc.add_route(Route("temp", "devices/+/temp", ToTask("thermo")))
    assert h.svc.broker is not None
    agent_pw = h.svc.broker.agent_password
    async with sub(h.port, AGENT_USERNAME, agent_pw, "edgevisor/deadletter") as s:
        await pub(h.port, "d1", "pw1", "devices/d1/temp", "{temp: 31")
        [(topic, payload)] = await s.messages(1)
    body = json.loads(payload)
    assert topic == "edgevisor/deadletter"
    assert body["topic"] == "devices/d1/temp" and body["routes"] == ["temp"]
    assert "not JSON" in body["reason"] and body["payload"] == "{temp: 31"
    assert h.calls == []
    assert h.svc.stats()["dead_letters"] == 1


@pytest.mark.parametrize("link", ["inprocess", "client"])
async def test_devices_shadow_update_delta_and_stale_version(make_service: Make, link: str) -> None:
    h = await make_service(link=link)
    h.svc.add_device("d1", "pw1")
    async with sub(h.port, "d1", "pw1", "edgevisor/shadow/d1/#") as s:
        update = {"state": {"desired": {"led": "on"}, "reported": {"led": "off"}}, "version": 0}
        await pub(h.port, "d1", "pw1", "edgevisor/shadow/d1/update", json.dumps(update))
        msgs = dict(await s.messages(3))  # our own update, the delta, accepted
        assert json.loads(msgs["edgevisor/shadow/d1/delta"]) == {
            "state": {"led": "on"},
            "version": 1,
        }
        accepted = json.loads(msgs["edgevisor/shadow/d1/update/accepted"])
        assert accepted["version"] == 1 and accepted["state"]["reported"] == {"led": "off"}
        # The same version again is stale now.
        await pub(h.port, "d1", "pw1", "edgevisor/shadow/d1/update", json.dumps(update))
        msgs = dict((await s.messages(5))[3:])
    rejected = json.loads(msgs["edgevisor/shadow/d1/update/rejected"])
    assert rejected["code"] == "shadow_conflict" and rejected["version"] == 1
    assert h.svc.get_shadow("d1").version == 1
    # Through the API the stale version is a typed error too.
    shadow = await h.svc.update_shadow("d1", reported={"led": "on"}, version=1)
    assert shadow.version == 2 and shadow.delta == {}


async def test_devices_task_result_routed_to_shadow_delta(make_service: Make) -> None:
    async def thermostat(_: str, event: dict[str, Any]) -> dict[str, Any]:
        return {"fan": "on" if event["payload"]["temp"] > 30 else "off"}

    h = await make_service(thermostat)
    h.svc.add_device("d1", "pw1")
    await h.svc.add_route(Route("in", "devices/+/temp", ToTask("thermostat")))
    await h.svc.add_route(
        Route("out", "tasks/thermostat/result", ToShadow("d1"), source_task="thermostat")
    )
    async with sub(h.port, "d1", "pw1", "edgevisor/shadow/d1/delta") as s:
        await pub(h.port, "d1", "pw1", "devices/d1/temp", '{"temp": 35}')
        [(_, payload)] = await s.messages(1)
    assert json.loads(payload) == {"state": {"fan": "on"}, "version": 1}


async def test_devices_offline_spool_delivers_in_order(make_service: Make) -> None:
    up = False
    delivered: list[SpoolItem] = []

    async def send(items: Sequence[SpoolItem]) -> None:
        if not up:
            raise PeerUnavailable("controller unreachable")
        delivered.extend(items)

    h = await make_service(send_to_controller=send)
    h.svc.add_device("d1", "pw1")
    await h.svc.add_route(Route("alarm", "devices/+/alarm", ToController()))
    for i in range(5):
        await pub(h.port, "d1", "pw1", "devices/d1/alarm", json.dumps({"i": i}))
    await wait_for(lambda: len(h.svc.spool) == 5)
    await h.svc.update_shadow("d1", desired={"led": "on"})
    await wait_for(lambda: len(h.svc.spool) == 6)
    await asyncio.sleep(0.5)  # several retry rounds while down
    assert delivered == []
    up = True
    await wait_for(lambda: len(delivered) == 6)
    assert [it.body["payload"]["i"] for it in delivered[:5]] == [0, 1, 2, 3, 4]
    assert delivered[5].kind == "shadow" and delivered[5].body["version"] == 1
    assert h.svc.spool.stats()["delivered"] == 6


async def test_devices_external_mosquitto_broker(make_service: Make, tmp_path: Path) -> None:
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    proc = await asyncio.create_subprocess_exec(
        "mosquitto", "-c", str(conf), stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        for _ in range(300):
            if (await pub(port, None, None, "probe", "1"))[0] == 0:
                break
            await asyncio.sleep(0.05)
        h = await make_service(external_url=f"mqtt://127.0.0.1:{port}")
        assert h.svc.broker is None
        h.svc.add_device("d1", "pw1")  # ACLs are mosquitto's business here
        await h.svc.add_route(Route("temp", "devices/+/temp", ToTask("t", "devices/d1/reply")))
        async with sub(port, "any", "any", "devices/d1/reply") as s:
            await pub(port, None, None, "devices/d1/temp", '{"temp": 1}')
            [(_, payload)] = await s.messages(1)
        assert json.loads(payload) == {"task": "t", "got": {"temp": 1}}
    finally:
        proc.kill()
        await proc.wait()


async def test_devices_regression_stop_right_after_spool_kick_does_not_hang(
    tmp_path: Path,
) -> None:
    """stop() hung forever: 3.11's wait_for swallowed the cancel when the spool's wake-up
    event was set in the same loop iteration (fixed by using asyncio.timeout)."""
    from edgevisor.devices.service import DeviceService, DevicesSettings

    async def call_task(name: str, event: dict[str, Any]) -> None:
        return None

    svc = DeviceService(DevicesSettings(broker_port=free_port()), tmp_path, call_task)
    await svc.start()
    svc.add_device("d1", "pw1")
    await svc.update_shadow("d1", desired={"a": 1})  # sets the spool kick
    async with asyncio.timeout(20):
        await svc.stop()


async def test_devices_state_survives_restart_and_timer_calls_task(tmp_path: Path) -> None:
    from edgevisor.devices.service import DeviceService, DevicesSettings
    from edgevisor.devices.timers import Timer

    calls: list[tuple[str, dict[str, Any]]] = []

    async def call_task(name: str, event: dict[str, Any]) -> dict[str, Any]:
        calls.append((name, event))
        return {"ok": True}

    settings = DevicesSettings(broker_port=free_port())
    svc = DeviceService(settings, tmp_path, call_task)
    await svc.start()
    try:
        svc.add_device("d1", "pw1")
        await svc.add_route(Route("temp", "devices/+/temp", ToTask("thermo", "devices/d1/r")))
        await svc.update_shadow("d1", desired={"led": "on"})
        svc.add_timer(Timer("tick", "* * * * * *", "ticker", {"n": 1}))  # every second
        await wait_for(lambda: any(name == "ticker" for name, _ in calls))
    finally:
        await svc.stop()
    tick = next(ev for name, ev in calls if name == "ticker")
    assert tick["timer"] == "tick" and tick["payload"] == {"n": 1}

    calls.clear()
    again = DeviceService(settings, tmp_path, call_task)
    await again.start()
    try:
        assert [d.name for d in again.devices()] == ["d1"]
        assert again.get_shadow("d1").desired == {"led": "on"}
        assert "tick" in again.timer_core.timers
        async with sub(settings.broker_port, "d1", "pw1", "devices/d1/r") as s:
            rc, err = await pub(settings.broker_port, "d1", "pw1", "devices/d1/temp", '{"t": 1}')
            assert rc == 0, err
            [(_, payload)] = await s.messages(1)
        assert json.loads(payload) == {"ok": True}
    finally:
        await again.stop()
