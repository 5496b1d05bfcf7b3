"""The pure route table: criteria, destinations, dead letters, grants."""

from __future__ import annotations

import json

import pytest

from edgevisor.devices.routes import (
    CallTask,
    DeadLetter,
    Forward,
    Message,
    Publish,
    Route,
    RouteError,
    RouteTable,
    ShadowUpdate,
    ToController,
    ToShadow,
    ToTask,
    ToTopic,
    grants,
    validate_route,
)


def _table(*routes: Route) -> RouteTable:
    t = RouteTable()
    for r in routes:
        t.add(r)
    return t


def _msg(topic: str, payload: object) -> Message:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return Message(topic, raw)


def test_devices_route_to_task_builds_event_with_source() -> None:
    t = _table(Route("r", "devices/+/temp", ToTask("thermo", "devices/d1/reply")))
    [action] = t.match(_msg("devices/d1/temp", {"temp": 31}))
    assert action == CallTask(
        "r",
        "thermo",
        {"topic": "devices/d1/temp", "source": "d1", "payload": {"temp": 31}},
        "devices/d1/reply",
    )


def test_devices_route_no_match_returns_nothing() -> None:
    t = _table(Route("r", "devices/+/temp", ToTask("thermo")))
    assert t.match(_msg("devices/d1/humidity", {"h": 1})) == []


@pytest.mark.parametrize(
    ("where", "payload", "fires"),
    [
        ({"temp": {"gt": 30}}, {"temp": 31}, True),
        ({"temp": {"gt": 30}}, {"temp": 30}, False),
        ({"temp": {"ge": 30, "lt": 40}}, {"temp": 30}, True),
        ({"temp": {"gt": 30}}, {"temp": "hot"}, False),  # type mismatch: no match, no crash
        ({"temp": {"gt": 30}}, {"other": 1}, False),
        ({"status": "on"}, {"status": "on"}, True),
        ({"status": "on"}, {"status": "off"}, False),
        ({"on": {"eq": 1}}, {"on": True}, False),  # JSON true is not 1
        ({"on": True}, {"on": True}, True),
        ({"a.b": {"in": [1, 2]}}, {"a": {"b": 2}}, True),
        ({"a.b": {"in": [1, 2]}}, {"a": {"b": 3}}, False),
        ({"a.b": {"exists": False}}, {"a": {}}, True),
        ({"a.b": {"exists": True}}, {"a": {}}, False),
        ({"x": {"ne": 1}}, {"x": 2}, True),
        ({"temp": {"gt": 30}}, [1, 2], False),  # not an object
    ],
)
def test_devices_route_where(where: dict[str, object], payload: object, fires: bool) -> None:
    t = _table(Route("r", "s/#", ToTask("t"), where=where))
    actions = t.match(_msg("s/x", payload))
    assert [type(a) for a in actions] == ([CallTask] if fires else [])


def test_devices_malformed_json_goes_to_dead_letter_without_call() -> None:
    t = _table(
        Route("a-task", "devices/+/temp", ToTask("thermo")),
        Route("b-mirror", "devices/+/temp", ToTopic("mirror/temp")),
    )
    actions = t.match(Message("devices/d1/temp", b"{not json"))
    # The raw mirror still fires; the task call does not.
    assert not any(isinstance(a, CallTask) for a in actions)
    assert Publish("b-mirror", "mirror/temp", b"{not json") in actions
    [dead] = [a for a in actions if isinstance(a, DeadLetter)]
    assert dead.routes == ("a-task",)
    assert "not JSON" in dead.reason
    body = json.loads(dead.to_payload())
    assert body["topic"] == "devices/d1/temp"
    assert body["payload"] == "{not json"
    assert body["reason"] == dead.reason


def test_devices_non_utf8_payload_dead_letter() -> None:
    t = _table(Route("r", "x/#", ToTask("t")))
    [dead] = t.match(Message("x/y", b"\xff\xfe"))
    assert isinstance(dead, DeadLetter) and "UTF-8" in dead.reason


def test_devices_nan_is_not_json() -> None:
    t = _table(Route("r", "x/#", ToTask("t")))
    [dead] = t.match(Message("x/y", b'{"v": NaN}'))
    assert isinstance(dead, DeadLetter)


def test_devices_shadow_destination_needs_object() -> None:
    t = _table(Route("r", "devices/+/set", ToShadow("d1")))
    assert t.match(_msg("devices/d1/set", {"led": "on"})) == [
        ShadowUpdate("r", "d1", "desired", {"led": "on"})
    ]
    [dead] = t.match(_msg("devices/d1/set", [1]))
    assert isinstance(dead, DeadLetter) and "object" in dead.reason


def test_devices_controller_destination() -> None:
    t = _table(Route("r", "devices/+/alarm", ToController()))
    assert t.match(_msg("devices/d2/alarm", {"a": 1})) == [
        Forward("r", {"topic": "devices/d2/alarm", "source": "d2", "payload": {"a": 1}})
    ]


def test_devices_source_device_criteria() -> None:
    t = _table(Route("r", "devices/+/temp", ToTask("t"), source_device="d1"))
    assert len(t.match(_msg("devices/d1/temp", {}))) == 1
    assert t.match(_msg("devices/d2/temp", {})) == []
    # Outside device roots the source is unknown; the ACL restricts who can publish there.
    t2 = _table(Route("r", "plant/temp", ToTask("t"), source_device="d1"))
    assert len(t2.match(_msg("plant/temp", {}))) == 1


def test_devices_source_task_routes_see_only_task_results() -> None:
    t = _table(
        Route("from-device", "tasks/#", ToTask("x")),
        Route("from-task", "tasks/thermo/result", ToShadow("d1"), source_task="thermo"),
    )
    result = Message("tasks/thermo/result", b'{"led": "on"}', source_task="thermo")
    assert t.match(result) == [ShadowUpdate("from-task", "d1", "desired", {"led": "on"})]
    plain = Message("tasks/thermo/result", b'{"led": "on"}')
    assert [a.route for a in t.match(plain) if isinstance(a, CallTask)] == ["from-device"]


def test_devices_routes_match_in_name_order() -> None:
    t = _table(Route("b", "in/#", ToTopic("out/b")), Route("a", "in/#", ToTopic("out/a")))
    got = [a.route for a in t.match(Message("in/x", b"1")) if isinstance(a, Publish)]
    assert got == ["a", "b"]


@pytest.mark.parametrize(
    ("route", "fragment"),
    [
        (Route("r", "a/#/b", ToTask("t")), "topic_filter"),
        (Route("", "a", ToTask("t")), "name"),
        (Route("r", "a/#", ToTask("t", "a/reply")), "own filter"),
        (Route("r", "a", ToTask("t", "reply/+")), "wildcard"),
        (Route("r", "a", ToTask("t"), where={"x": {"like": 1}}), "operator"),
        (Route("r", "a", ToTask("t"), where={"x": {"in": 1}}), "list"),
        (Route("r", "a", ToShadow("d", "delta")), "section"),
        (Route("r", "a", ToTask("t"), source_device="d", source_task="t"), "exclusive"),
    ],
)
def test_devices_invalid_routes_rejected(route: Route, fragment: str) -> None:
    with pytest.raises(RouteError, match=fragment):
        validate_route(route)


def test_devices_route_to_missing_task_rejected() -> None:
    t = RouteTable()
    with pytest.raises(RouteError, match="no task named 'ghost'"):
        t.add(Route("r", "a", ToTask("ghost")), task_exists=lambda name: name == "real")
    assert t.routes == {}
    t.add(Route("r", "a", ToTask("real")), task_exists=lambda name: name == "real")
    assert "r" in t.routes


def test_devices_route_json_round_trip() -> None:
    routes = [
        Route("a", "devices/+/t", ToTask("t", "r/x"), source_device="d1", where={"t": {"gt": 1}}),
        Route("b", "x/#", ToTopic("y")),
        Route("c", "tasks/t/result", ToShadow("d1", "reported"), source_task="t"),
        Route("d", "z", ToController()),
    ]
    for r in routes:
        assert Route.from_json(json.loads(json.dumps(r.to_json()))) == r


def test_devices_grants() -> None:
    routes = [
        Route("a", "plant/+/temp", ToTask("t", "plant/replies/d1"), source_device="d1"),
        Route("b", "devices/d1/x", ToTask("t", "devices/d1/reply"), source_device="d1"),
        Route("c", "other", ToTask("t", "other/reply"), source_device="d2"),
    ]
    assert grants(routes, "d1") == (["plant/+/temp"], ["plant/replies/d1"])
    assert grants(routes, "d3") == ([], [])
