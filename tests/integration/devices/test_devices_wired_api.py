"""Devices end to end: SDK -> controller -> agent capability -> broker, with the real
mosquitto clients as the devices."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from devices_wired_helpers import ECHO_TASK, Fleet, MqttSub, bundle, fleet, mqtt_pub, wait_until

from edgevisor import Conflict, NotFound, RequestError


@pytest.fixture
def f(tmp_path: Path) -> Iterator[Fleet]:
    with fleet(tmp_path) as fl:
        yield fl


def test_device_route_calls_task_and_reply_arrives(f: Fleet) -> None:
    acme = f.account_client("acme")
    acme.deploy_task(bundle(ECHO_TASK))
    dev = acme.add_device("d1")
    assert dev.username == "acme.d1" and dev.host == "local" and dev.password
    assert dev.broker_url.endswith(f":{f.broker_port}")
    route = acme.add_route({
        "name": "r1",
        "topic_filter": "devices/acme.d1/readings",
        "source_device": "d1",
        "destination": {"kind": "task", "task": "echo", "reply_topic": "devices/acme.d1/reply"},
    })  # fmt: skip
    assert route.destination["task"] == "echo" and route.source_device == "d1"
    with MqttSub(f.broker_port, dev.username, dev.password, "devices/acme.d1/reply") as sub:
        res = mqtt_pub(f.broker_port, dev.username, dev.password, "devices/acme.d1/readings",
                       json.dumps({"temp": 21.5}))  # fmt: skip
        assert res.returncode == 0, res.stderr
        topic, payload = sub.messages(1)[0]
    assert topic == "devices/acme.d1/reply"
    assert json.loads(payload) == {"echo": {"temp": 21.5}, "source": "acme.d1"}
    # Unregistered clients and wrong passwords are refused by the broker.
    for user, pw in (("acme.nobody", "x"), (dev.username, "wrong"), (None, None)):
        res = mqtt_pub(f.broker_port, user, pw, "devices/acme.d1/readings", "{}")
        assert res.returncode != 0
        assert "not authori" in res.stderr.lower() or "refused" in res.stderr.lower()
    assert [d.name for d in acme.list_devices()] == ["d1"]
    assert [r.name for r in acme.list_routes()] == ["r1"]


def test_routes_are_checked_at_creation(f: Fleet) -> None:
    acme = f.account_client("acme")
    other = f.account_client("other")
    acme.deploy_task(bundle(ECHO_TASK))
    acme.add_device("d1")
    for bad in ("", "a/b", "x" * 70):
        with pytest.raises(RequestError):
            acme.add_device(bad)
    with pytest.raises(Conflict):
        acme.add_device("d1")
    with pytest.raises(RequestError, match="no task named"):
        acme.add_route({"name": "bad", "topic_filter": "devices/acme.d1/x",
                        "destination": {"kind": "task", "task": "missing"}})  # fmt: skip
    with pytest.raises(RequestError, match="outside account"):
        acme.add_route({"name": "bad", "topic_filter": "devices/#",
                        "destination": {"kind": "task", "task": "echo"}})  # fmt: skip
    with pytest.raises(RequestError, match="outside account"):
        acme.add_route({"name": "bad", "topic_filter": "devices/other.d9/x",
                        "destination": {"kind": "task", "task": "echo"}})  # fmt: skip
    # The other account's route cannot call acme's task.
    with pytest.raises(RequestError, match="no task named"):
        other.add_route({"name": "steal", "topic_filter": "other/x",
                         "destination": {"kind": "task", "task": "echo"}})  # fmt: skip
    assert acme.list_routes() == [] and other.list_routes() == []
    with pytest.raises(NotFound):
        other.get_shadow("d1")


def test_shadow_update_publishes_delta_and_checks_version(f: Fleet) -> None:
    acme = f.account_client("acme")
    dev = acme.add_device("lamp")
    with MqttSub(f.broker_port, dev.username, dev.password,
                 "edgevisor/shadow/acme.lamp/delta") as sub:  # fmt: skip
        s1 = acme.update_shadow("lamp", desired={"on": True})
        assert s1.version == 1 and s1.state["delta"] == {"on": True}
        _topic, payload = sub.messages(1)[0]
    assert json.loads(payload) == {"state": {"on": True}, "version": 1}
    # The device reports over MQTT; the API sees it.
    res = mqtt_pub(f.broker_port, dev.username, dev.password, "edgevisor/shadow/acme.lamp/update",
                   json.dumps({"state": {"reported": {"on": True}}}))  # fmt: skip
    assert res.returncode == 0
    s2 = wait_until(lambda: (s := acme.get_shadow("lamp")).version == 2 and s, 30, "report")
    assert s2.state["delta"] == {} and s2.state["reported"] == {"on": True}
    with pytest.raises(Conflict) as exc:
        acme.update_shadow("lamp", desired={"on": False}, version=1)
    assert "current version is 2" in exc.value.message
    s3 = acme.update_shadow("lamp", desired={"on": False}, version=2)
    assert s3.version == 3 and s3.state["delta"] == {"on": False}


def test_timer_calls_a_task(f: Fleet) -> None:
    acme = f.account_client("acme")
    acme.deploy_task(bundle(ECHO_TASK))
    with pytest.raises(RequestError, match="no task named"):
        acme.add_timer({"name": "t0", "cron": "* * * * * *", "task": "missing"})
    t = acme.add_timer({"name": "t1", "cron": "* * * * * *", "task": "echo", "event": {"a": 1}})
    assert t.task == "echo" and t.next_run is not None
    svc = f.agent.capability("devices").service
    wait_until(lambda: svc.timers.fired >= 2, 30, "two timer fires")
    assert [x.name for x in acme.list_timers()] == ["t1"]
    acme.remove_timer("t1")
    assert acme.list_timers() == []
