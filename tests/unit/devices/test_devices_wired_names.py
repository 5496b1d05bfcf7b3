"""How an account's routes map onto the agent's shared route table (pure)."""

from __future__ import annotations

import pytest

from edgevisor.agent.devices import check_topic, qualify_route, unqualify_route
from edgevisor.devices.routes import Message, RouteTable, ToShadow, ToTask
from edgevisor.errors import RequestError


@pytest.mark.parametrize(
    "topic",
    ["devices/acme.d1/x", "devices/acme.d1/#", "tasks/acme.t/result", "acme/x/y", "acme/#"],
)
def test_topics_inside_the_account_are_allowed(topic: str) -> None:
    check_topic("acme", topic, "topic")


@pytest.mark.parametrize(
    "topic",
    [
        "devices/#",
        "devices/+/x",
        "devices/acme./x",
        "devices/acme.+/x",
        "devices/other.d1/x",
        "devices/acmex.d1/x",
        "tasks/other.t/result",
        "other/x",
        "acme",
        "#",
        "+/x",
        "edgevisor/shadow/acme.d1/update",
    ],
)
def test_topics_outside_the_account_are_refused(topic: str) -> None:
    with pytest.raises(RequestError, match="outside account"):
        check_topic("acme", topic, "topic")


def test_qualify_and_unqualify_round_trip() -> None:
    spec = {
        "name": "r1",
        "topic_filter": "devices/acme.d1/temp",
        "source_device": "d1",
        "where": {"temp": {"gt": 30}},
        "destination": {"kind": "task", "task": "alarm", "reply_topic": "acme/alarms"},
    }
    route = qualify_route("acme", spec)
    assert route.name == "acme.r1" and route.source_device == "acme.d1"
    assert route.destination == ToTask("acme.alarm", "acme/alarms")
    assert unqualify_route(route) == {**spec, "source_task": None}
    shadow = qualify_route("acme", {"name": "s", "topic_filter": "tasks/acme.t/result",
                                    "source_task": "t",
                                    "destination": {"kind": "shadow", "device": "d1"}})  # fmt: skip
    assert shadow.source_task == "acme.t" and shadow.destination == ToShadow("acme.d1")


def test_an_accounts_route_never_sees_another_accounts_device() -> None:
    table = RouteTable()
    table.add(qualify_route("acme", {"name": "all", "topic_filter": "devices/acme.d1/#",
                                     "destination": {"kind": "task", "task": "t"}}))  # fmt: skip
    assert table.match(Message("devices/other.d1/x", b"{}")) == []
    assert len(table.match(Message("devices/acme.d1/x", b"{}"))) == 1


def test_reply_topic_outside_the_account_is_refused() -> None:
    with pytest.raises(RequestError, match="reply topic"):
        qualify_route("acme", {"name": "r", "topic_filter": "acme/in",
                               "destination": {"kind": "task", "task": "t",
                                               "reply_topic": "devices/other.d1/cmd"}})  # fmt: skip
    with pytest.raises(RequestError, match="destination topic"):
        qualify_route("acme", {"name": "r", "topic_filter": "acme/in",
                               "destination": {"kind": "topic", "topic": "other/x"}})  # fmt: skip


@pytest.mark.parametrize("name", ["", None, "a/b", "a b", "x" * 70])
def test_bad_route_names_are_refused(name: object) -> None:
    with pytest.raises(RequestError):
        qualify_route("acme", {"name": name, "topic_filter": "acme/x",
                               "destination": {"kind": "controller"}})  # fmt: skip
